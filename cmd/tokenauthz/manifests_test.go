package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"google.golang.org/protobuf/encoding/protojson"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	securityv1beta1 "istio.io/api/security/v1beta1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/tokenauthz/tokenauthz/authz/kube"
)

// render builds a kustomization as `kubectl apply -k` would and decodes
// every object strictly into its upstream API type: a misspelled field
// fails.
func render(t *testing.T, dir string) map[string]any {
	t.Helper()
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	out := map[string]any{}
	for _, r := range rm.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		obj := newObject(t, r.GetKind())
		if err := yaml.UnmarshalStrict(y, obj); err != nil {
			t.Fatalf("%s %s/%s: %v", dir, r.GetKind(), r.GetName(), err)
		}
		out[r.GetKind()+"/"+r.GetName()] = obj
	}
	return out
}

// newObject is the Go type a manifest of kind decodes into, strictly.
func newObject(t *testing.T, kind string) any {
	t.Helper()
	switch kind {
	case "Deployment":
		return &appsv1.Deployment{}
	case "StatefulSet":
		return &appsv1.StatefulSet{}
	case "Service":
		return &corev1.Service{}
	case "ConfigMap":
		return &corev1.ConfigMap{}
	case "Secret":
		return &corev1.Secret{}
	case "ServiceAccount":
		return &corev1.ServiceAccount{}
	case "Namespace":
		return &corev1.Namespace{}
	case "HorizontalPodAutoscaler":
		return &autoscalingv2.HorizontalPodAutoscaler{}
	case "PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}
	case "NetworkPolicy":
		return &networkingv1.NetworkPolicy{}
	case "ServiceMonitor":
		return &monitoringv1.ServiceMonitor{}
	case "PrometheusRule":
		return &monitoringv1.PrometheusRule{}
	case "CustomResourceDefinition":
		return &apiextensionsv1.CustomResourceDefinition{}
	case "ClusterRole":
		return &rbacv1.ClusterRole{}
	case "ClusterRoleBinding":
		return &rbacv1.ClusterRoleBinding{}
	}
	t.Fatalf("no strict decoder for kind %q", kind)
	return nil
}

func TestKubernetesManifests(t *testing.T) {
	for _, dir := range []string{"../../deploy/kubernetes/base", "../../deploy/kubernetes/overlays/redis", "../../deploy/kubernetes/overlays/istio"} {
		t.Run(dir, func(t *testing.T) {
			objs := render(t, dir)
			d, ok := objs["Deployment/tokenauthz"].(*appsv1.Deployment)
			if !ok {
				t.Fatalf("no Deployment/tokenauthz in %v", keys(objs))
			}
			if d.Namespace != "tokenauthz" {
				t.Errorf("namespace %q", d.Namespace)
			}
			pod := d.Spec.Template.Spec
			c := pod.Containers[0]
			for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
				if p == nil || p.GRPC == nil || p.GRPC.Port != 9191 || p.GRPC.Service == nil || *p.GRPC.Service != name {
					t.Errorf("%s probe is not a native gRPC probe on 9191 for service %q: %+v", name, name, p)
				}
			}
			sc := c.SecurityContext
			if pod.SecurityContext == nil || pod.SecurityContext.RunAsNonRoot == nil || !*pod.SecurityContext.RunAsNonRoot ||
				sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
				sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.Capabilities == nil ||
				len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
				t.Errorf("security context is not restrictive: pod %+v, container %+v", pod.SecurityContext, sc)
			}
			if c.Resources.Limits.Memory().IsZero() || c.Resources.Requests.Cpu().IsZero() {
				t.Error("resource requests/limits missing")
			}
			// GOMEMLIMIT about 90% of the memory limit: room for stacks and
			// the runtime; at 100% the GC only reacts when it is too late.
			gomemlimit := false
			for _, e := range c.Env {
				if e.Name != "GOMEMLIMIT" {
					continue
				}
				q, err := resource.ParseQuantity(strings.TrimSuffix(e.Value, "B"))
				ratio := float64(q.Value()) / float64(c.Resources.Limits.Memory().Value())
				gomemlimit = err == nil && ratio >= 0.8 && ratio <= 0.95
				if !gomemlimit {
					t.Errorf("GOMEMLIMIT %q is %.0f%% of the memory limit, want about 90%%", e.Value, 100*ratio)
				}
			}
			if !gomemlimit {
				t.Error("GOMEMLIMIT is not set to about 90% of the memory limit")
			}
			// A startup probe must add something over liveness.
			if sp := c.StartupProbe; sp != nil && c.LivenessProbe != nil && sp.GRPC != nil && c.LivenessProbe.GRPC != nil &&
				*sp.GRPC.Service == *c.LivenessProbe.GRPC.Service {
				t.Error("the startup probe asks what the liveness probe asks")
			}
			if img := c.Image; strings.HasSuffix(img, ":latest") || !strings.Contains(img, ":") {
				t.Errorf("image %q: pin a tag (and a digest), never latest", img)
			}
			// NetworkPolicy: Check from anywhere, the HTTP port (metrics,
			// admin) not.
			np, _ := objs["NetworkPolicy/tokenauthz"].(*networkingv1.NetworkPolicy)
			if np == nil {
				t.Fatal("no NetworkPolicy")
			}
			npSel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
			if err != nil || !npSel.Matches(labels.Set(d.Spec.Template.Labels)) {
				t.Errorf("the NetworkPolicy does not select the pods: %v", err)
			}
			for _, r := range np.Spec.Ingress {
				for _, port := range r.Ports {
					if port.Port != nil && port.Port.String() == "http" {
						for _, peer := range r.From {
							if peer.NamespaceSelector != nil && len(peer.NamespaceSelector.MatchLabels) == 0 && len(peer.NamespaceSelector.MatchExpressions) == 0 {
								t.Error("the HTTP port (metrics, admin) is open to every namespace")
							}
						}
					}
				}
			}
			if strings.HasSuffix(dir, "istio") {
				ns := objs["Namespace/tokenauthz"].(*corev1.Namespace)
				if ns.Labels["istio-injection"] != "enabled" {
					t.Errorf("the istio overlay does not label the namespace for injection: %v", ns.Labels)
				}
			}
			if grace := pod.TerminationGracePeriodSeconds; grace == nil || *grace < 5+15 {
				t.Error("terminationGracePeriodSeconds is shorter than lameduck + shutdown_timeout")
			}

			svc := objs["Service/tokenauthz"].(*corev1.Service)
			if p := svc.Spec.Ports[0]; p.Name != "grpc" || p.Port != 9191 || p.AppProtocol == nil || *p.AppProtocol != "grpc" {
				t.Errorf("service port %+v: want grpc/9191 with appProtocol grpc", p)
			}
			for k, v := range svc.Spec.Selector {
				if d.Spec.Template.Labels[k] != v {
					t.Errorf("service selector %s=%s does not select the pods %v", k, v, d.Spec.Template.Labels)
				}
			}
			if hpa := objs["HorizontalPodAutoscaler/tokenauthz"].(*autoscalingv2.HorizontalPodAutoscaler); hpa.Spec.ScaleTargetRef.Name != d.Name ||
				hpa.Spec.MinReplicas == nil || *hpa.Spec.MinReplicas < 2 {
				t.Errorf("HPA %+v", hpa.Spec)
			}
			pdb := objs["PodDisruptionBudget/tokenauthz"].(*policyv1.PodDisruptionBudget)
			sel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
			if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
				t.Errorf("the PDB does not select the pods: %v", err)
			}

			// The mounted config is a valid tokenauthz config (secret files
			// live in the cluster, not here), and the pod mounts it where
			// the args say.
			var cm *corev1.ConfigMap
			for k, o := range objs {
				if strings.HasPrefix(k, "ConfigMap/tokenauthz-config") {
					cm = o.(*corev1.ConfigMap)
				}
			}
			if cm == nil {
				t.Fatal("no tokenauthz-config ConfigMap")
			}
			if pod.Volumes[0].ConfigMap == nil || pod.Volumes[0].ConfigMap.Name != cm.Name {
				t.Errorf("the pod mounts ConfigMap %v, the build made %s", pod.Volumes[0].ConfigMap, cm.Name)
			}
			if c.Args[2] != c.VolumeMounts[0].MountPath+"/config.yaml" {
				t.Errorf("args %v do not point into the config mount %s", c.Args, c.VolumeMounts[0].MountPath)
			}
			if _, err := parseConfig([]byte(cm.Data["config.yaml"]), dir); err != nil {
				for _, p := range err.(*configError).problems {
					if !strings.Contains(p, "no such file") {
						t.Errorf("config.yaml: %s", p)
					}
				}
			}
			checkPolicyResources(t, objs, "tokenauthz", d.Spec.Template.Spec.ServiceAccountName)
			if strings.HasSuffix(dir, "redis") {
				rd, _ := objs["StatefulSet/tokenauthz-redis"].(*appsv1.StatefulSet)
				if rd == nil || !strings.Contains(cm.Data["config.yaml"], "tokenauthz-redis:6379") {
					t.Fatal("the redis overlay adds no Redis or does not point the config at it")
				}
				if rd.Namespace != "tokenauthz" {
					t.Error("redis is not in the tokenauthz namespace")
				}
				// Revocations are durable: an append-only file on a persistent volume.
				args := strings.Join(rd.Spec.Template.Spec.Containers[0].Args, " ")
				if !strings.Contains(args, "--appendonly yes") || len(rd.Spec.VolumeClaimTemplates) != 1 ||
					rd.Spec.VolumeClaimTemplates[0].Name != rd.Spec.Template.Spec.Containers[0].VolumeMounts[0].Name {
					t.Errorf("redis must persist to a volume with AOF: args %q, claims %v", args, rd.Spec.VolumeClaimTemplates)
				}
			}
		})
	}
}

func keys(m map[string]any) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestIstioResources(t *testing.T) {
	mesh, err := os.ReadFile("../../deploy/istio/meshconfig.yaml")
	if err != nil {
		t.Fatal(err)
	}
	mj, err := yaml.YAMLToJSON(mesh)
	if err != nil {
		t.Fatal(err)
	}
	var mc meshv1alpha1.MeshConfig
	if err := protojson.Unmarshal(mj, &mc); err != nil {
		t.Fatalf("meshconfig.yaml is not an Istio MeshConfig: %v", err)
	}
	if len(mc.GetExtensionProviders()) != 1 {
		t.Fatal("no extension provider")
	}
	p := mc.GetExtensionProviders()[0]
	g := p.GetEnvoyExtAuthzGrpc()
	if g == nil || g.GetPort() != 9191 || g.GetTimeout().AsDuration() == 0 || g.GetFailOpen() || g.GetStatusOnError() != "503" ||
		g.GetService() != "tokenauthz.tokenauthz.svc.cluster.local" {
		t.Errorf("provider %v: want envoyExtAuthzGrpc on tokenauthz:9191, explicit timeout, fail closed", p)
	}

	ap, err := os.ReadFile("../../deploy/istio/authorizationpolicy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var wrapper struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Metadata   metav1.ObjectMeta `json:"metadata"`
		Spec       json.RawMessage   `json:"spec"`
	}
	if err := yaml.UnmarshalStrict(ap, &wrapper); err != nil {
		t.Fatal(err)
	}
	var pol securityv1beta1.AuthorizationPolicy
	if err := protojson.Unmarshal(wrapper.Spec, &pol); err != nil {
		t.Fatalf("authorizationpolicy.yaml spec: %v", err)
	}
	if wrapper.Kind != "AuthorizationPolicy" || wrapper.APIVersion != "security.istio.io/v1" ||
		pol.GetAction() != securityv1beta1.AuthorizationPolicy_CUSTOM || pol.GetProvider().GetName() != p.GetName() {
		t.Errorf("policy %s %s: action %v provider %q, want CUSTOM with provider %q", wrapper.APIVersion, wrapper.Kind,
			pol.GetAction(), pol.GetProvider().GetName(), p.GetName())
	}

	// What the CUSTOM policy leaves out skips authorization: exact paths
	// only, since "/healthz*" would also skip /healthz/..;/admin.
	for _, r := range pol.GetRules() {
		for _, to := range r.GetTo() {
			for _, np := range to.GetOperation().GetNotPaths() {
				if strings.Contains(np, "*") {
					t.Errorf("notPaths %q skips authorization by a pattern: use exact paths", np)
				}
			}
			if len(to.GetOperation().GetNotMethods())+len(to.GetOperation().GetNotHosts())+len(to.GetOperation().GetNotPorts()) > 0 {
				t.Errorf("the CUSTOM policy skips authorization by method, host or port: %v", to.GetOperation())
			}
		}
	}

	// The README shows these files as they are.
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"meshconfig.yaml": mesh, "authorizationpolicy.yaml": ap} {
		if !strings.Contains(string(readme), string(b)) {
			t.Errorf("README does not show deploy/istio/%s as it is", name)
		}
	}
}

// checkPolicyResources: the CRDs are installed, and the pods' account may
// read the three resources and write their status, nothing more (issue 21:
// least privilege; no Secrets, Namespaces or Leases).
func checkPolicyResources(t *testing.T, objs map[string]any, namespace, account string) {
	t.Helper()
	for _, crd := range []string{"tokenpolicies.tokenauthz.io", "tokenissuers.tokenauthz.io", "clustertokenissuers.tokenauthz.io"} {
		if objs["CustomResourceDefinition/"+crd] == nil {
			t.Errorf("CRD %s is not installed", crd)
		}
	}
	var role *rbacv1.ClusterRole
	var binding *rbacv1.ClusterRoleBinding
	for k, o := range objs {
		switch o := o.(type) {
		case *rbacv1.ClusterRole:
			role = o
		case *rbacv1.ClusterRoleBinding:
			binding = o
		}
		_ = k
	}
	if role == nil || binding == nil {
		t.Fatal("no ClusterRole and ClusterRoleBinding for the policy resources")
	}
	if binding.RoleRef.Name != role.Name || len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "ServiceAccount" ||
		binding.Subjects[0].Name != account || binding.Subjects[0].Namespace != namespace {
		t.Errorf("the binding does not give the role to the pods' account %s/%s: %+v", namespace, account, binding)
	}
	want := map[string]string{
		"tokenpolicies": "get,list,watch", "tokenissuers": "get,list,watch", "clustertokenissuers": "get,list,watch",
		"tokenpolicies/status": "update", "tokenissuers/status": "update", "clustertokenissuers/status": "update",
	}
	got := map[string]string{}
	for _, r := range role.Rules {
		if len(r.APIGroups) != 1 || r.APIGroups[0] != "tokenauthz.io" || len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
			t.Errorf("a rule beyond tokenauthz.io: %+v", r)
		}
		for _, res := range r.Resources {
			got[res] = strings.Join(r.Verbs, ",")
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("ClusterRole grants %v, want exactly %v", got, want)
	}
}

// TestPolicyExamples: the example team resources decode strictly into the
// API types and are accepted against the base config, as the pods would
// (tokenauthz validate -f); the chart's CRDs are the generated ones.
func TestPolicyExamples(t *testing.T) {
	cfg, err := loadConfig("../../deploy/kubernetes/base/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("../../deploy/kubernetes/examples/team-orders.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if p := kube.ValidateDocuments(&cfg.Config, &cfg.Kubernetes, "default", map[string][]byte{"team-orders.yaml": b}); len(p) > 0 {
		t.Errorf("the example is refused: %v", p)
	}
	var out, errb strings.Builder
	if code := cli([]string{"validate", "--config", "../../deploy/kubernetes/base/config.yaml", "-f", "../../deploy/kubernetes/examples/team-orders.yaml"}, &out, &errb); code != 0 {
		t.Errorf("validate -f: %d %s", code, errb.String())
	}
	bad := strings.Replace(string(b), "'orders-writer' in claims.roles", "claims.roles.exists(r, r ==)", 1)
	bad = strings.Replace(bad, "orders.example.com,", "orders.other.org,", 1)
	if p := kube.ValidateDocuments(&cfg.Config, &cfg.Kubernetes, "default", map[string][]byte{"bad.yaml": []byte(bad)}); len(p) != 1 ||
		!strings.Contains(p[0], "HostNotDelegated") {
		t.Errorf("an undelegated host: %v", p)
	}
	bad = strings.Replace(string(b), "'orders-writer' in claims.roles", "claims.roles.exists(r, r ==)", 1)
	if p := kube.ValidateDocuments(&cfg.Config, &cfg.Kubernetes, "default", map[string][]byte{"bad.yaml": []byte(bad)}); len(p) != 1 ||
		!strings.Contains(p[0], "InvalidRoute") || !strings.Contains(p[0], "routes[1].when[0]") || !strings.Contains(p[0], ":1:") {
		t.Errorf("invalid CEL: %v", p)
	}
	files, _ := filepath.Glob("../../deploy/kubernetes/crds/*.yaml")
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		gen, _ := os.ReadFile(f)
		chart, err := os.ReadFile(filepath.Join("../../deploy/helm/tokenauthz/crds", filepath.Base(f)))
		if err != nil || string(chart) != string(gen) {
			t.Errorf("the chart's %s is not the generated CRD (cp deploy/kubernetes/crds/tokenauthz.io_*.yaml deploy/helm/tokenauthz/crds/)", filepath.Base(f))
		}
	}
}
