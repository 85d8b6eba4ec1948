package kube_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestGeneratedUpToDate: the committed CRD YAML and deepcopy code are what
// controller-gen makes from api/v1alpha1 now. After changing the types:
//
//	go tool controller-gen object crd paths=./api/... output:crd:dir=deploy/kubernetes/crds
//	cp deploy/kubernetes/crds/tokenauthz.io_*.yaml deploy/helm/tokenauthz/crds/
func TestGeneratedUpToDate(t *testing.T) {
	if testing.Short() {
		t.Skip("builds controller-gen: not in -short")
	}
	root, _ := filepath.Abs("../..")
	out := t.TempDir()
	deepcopy := filepath.Join(root, "api/v1alpha1/zz_generated.deepcopy.go")
	before, err := os.ReadFile(deepcopy)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "tool", "controller-gen", "object", "crd", "paths=./api/...", "output:crd:dir="+out)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("controller-gen: %v\n%s", err, b)
	}
	after, _ := os.ReadFile(deepcopy)
	if string(after) != string(before) {
		_ = os.WriteFile(deepcopy, before, 0o644)
		t.Error("api/v1alpha1/zz_generated.deepcopy.go is stale: run controller-gen (see this test's comment)")
	}
	gen, _ := filepath.Glob(filepath.Join(out, "*.yaml"))
	if len(gen) != 3 {
		t.Fatalf("controller-gen made %v", gen)
	}
	for _, f := range gen {
		want, _ := os.ReadFile(f)
		for _, dir := range []string{"deploy/kubernetes/crds", "deploy/helm/tokenauthz/crds"} {
			got, err := os.ReadFile(filepath.Join(root, dir, filepath.Base(f)))
			if err != nil || string(got) != string(want) {
				t.Errorf("%s/%s is not what controller-gen makes now (see this test's comment)", dir, filepath.Base(f))
			}
		}
	}
}
