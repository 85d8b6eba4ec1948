package deploy_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	egv1a1 "github.com/envoyproxy/gateway/api/v1alpha1"
	gwapiv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwapiv1b1 "sigs.k8s.io/gateway-api/apis/v1beta1"
	"sigs.k8s.io/yaml"
)

// TestEnvoyGatewayManifests decodes deploy/envoy-gateway strictly into
// Envoy Gateway's and Gateway API's Go types (a misspelled field fails) and
// checks that they wire the route to tokenauthz's Service, fail closed, and
// grant the cross-namespace reference.
func TestEnvoyGatewayManifests(t *testing.T) {
	var (
		policies []*egv1a1.SecurityPolicy
		routes   = map[string]*gwapiv1.HTTPRoute{}
		grants   []*gwapiv1b1.ReferenceGrant
	)
	files, _ := filepath.Glob("envoy-gateway/*.yaml")
	if len(files) == 0 {
		t.Fatal("no manifests in deploy/envoy-gateway")
	}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range bytes.Split(raw, []byte("\n---\n")) {
			var meta struct {
				Kind string `json:"kind"`
			}
			if err := yaml.Unmarshal(doc, &meta); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			var obj any
			switch meta.Kind {
			case "SecurityPolicy":
				p := &egv1a1.SecurityPolicy{}
				policies, obj = append(policies, p), p
			case "HTTPRoute":
				obj = &gwapiv1.HTTPRoute{}
			case "ReferenceGrant":
				g := &gwapiv1b1.ReferenceGrant{}
				grants, obj = append(grants, g), g
			default:
				t.Fatalf("%s: no strict decoder for kind %q", f, meta.Kind)
			}
			if err := yaml.UnmarshalStrict(doc, obj); err != nil {
				t.Fatalf("%s %s: %v", f, meta.Kind, err)
			}
			if r, ok := obj.(*gwapiv1.HTTPRoute); ok {
				routes[r.Namespace+"/"+r.Name] = r
			}
		}
	}
	if len(policies) != 1 || len(grants) != 1 {
		t.Fatalf("want one SecurityPolicy and one ReferenceGrant, got %d and %d", len(policies), len(grants))
	}
	p := policies[0]
	ea := p.Spec.ExtAuth
	if ea == nil || ea.GRPC == nil || len(ea.GRPC.BackendRefs) != 1 || ea.HTTP != nil {
		t.Fatalf("the SecurityPolicy must call tokenauthz over gRPC: %+v", ea)
	}
	if ea.FailOpen == nil || *ea.FailOpen {
		t.Error("the SecurityPolicy must fail closed (failOpen: false)")
	}
	ref := ea.GRPC.BackendRefs[0].BackendObjectReference
	if ref.Name != "tokenauthz" || ref.Namespace == nil || *ref.Namespace != "tokenauthz" || ref.Port == nil || *ref.Port != 9191 {
		t.Errorf("backendRef %+v: want Service tokenauthz.tokenauthz:9191 (deploy/kubernetes/base)", ref)
	}
	g := grants[0]
	if g.Namespace != string(*ref.Namespace) || len(g.Spec.From) != 1 || string(g.Spec.From[0].Namespace) != p.Namespace ||
		g.Spec.From[0].Kind != "SecurityPolicy" || len(g.Spec.To) != 1 || g.Spec.To[0].Kind != "Service" ||
		g.Spec.To[0].Name == nil || string(*g.Spec.To[0].Name) != string(ref.Name) {
		t.Errorf("the ReferenceGrant does not let the policy's namespace reach the Service: %+v", g.Spec)
	}
	for _, tr := range p.Spec.TargetRefs {
		if tr.Kind != "HTTPRoute" || routes[p.Namespace+"/"+string(tr.Name)] == nil {
			t.Errorf("the SecurityPolicy targets %s %s, which deploy/envoy-gateway does not define", tr.Kind, tr.Name)
		}
	}
}
