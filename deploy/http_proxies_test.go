package deploy_test

import (
	"os"
	"strings"
	"testing"

	egv1a1 "github.com/envoyproxy/gateway/api/v1alpha1"
	"google.golang.org/protobuf/encoding/protojson"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// TestHTTPProxyManifests decodes deploy/http strictly into each project's
// Go types (Traefik's module cannot be had here: its Middleware is held to
// the fields its documentation gives) and checks that each calls the HTTP
// endpoint's path for its shape, on port 9192, failing closed.
func TestHTTPProxyManifests(t *testing.T) {
	read := func(name string) []byte {
		b, err := os.ReadFile("http/" + name)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var sp egv1a1.SecurityPolicy
	if err := yaml.UnmarshalStrict(read("envoy-gateway-securitypolicy.yaml"), &sp); err != nil {
		t.Fatal(err)
	}
	ea := sp.Spec.ExtAuth
	if ea == nil || ea.HTTP == nil || ea.GRPC != nil || ea.HTTP.Path == nil || *ea.HTTP.Path != "/envoy" ||
		len(ea.HTTP.BackendRefs) != 1 || *ea.HTTP.BackendRefs[0].Port != 9192 || ea.FailOpen == nil || *ea.FailOpen ||
		len(ea.HTTP.HeadersToBackend) == 0 {
		t.Errorf("Envoy Gateway extAuth.http: %+v", ea)
	}

	mj, err := yaml.YAMLToJSON(read("istio-meshconfig.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var mc meshv1alpha1.MeshConfig
	if err := protojson.Unmarshal(mj, &mc); err != nil {
		t.Fatalf("istio-meshconfig.yaml: %v", err)
	}
	h := mc.GetExtensionProviders()[0].GetEnvoyExtAuthzHttp()
	if h == nil || h.GetPort() != 9192 || h.GetPathPrefix() != "/envoy" || h.GetFailOpen() || h.GetTimeout().AsDuration() == 0 ||
		!strings.Contains(strings.Join(h.GetHeadersToDownstreamOnDeny(), ","), "www-authenticate") || len(h.GetHeadersToUpstreamOnAllow()) == 0 {
		t.Errorf("Istio envoyExtAuthzHttp: %v", h)
	}

	var ing networkingv1.Ingress
	if err := yaml.UnmarshalStrict(read("ingress-nginx.yaml"), &ing); err != nil {
		t.Fatal(err)
	}
	if u := ing.Annotations["nginx.ingress.kubernetes.io/auth-url"]; !strings.HasSuffix(u, ":9192/nginx") ||
		ing.Annotations["nginx.ingress.kubernetes.io/auth-response-headers"] == "" {
		t.Errorf("ingress-nginx annotations: %v", ing.Annotations)
	}

	var mw struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Metadata   metav1.ObjectMeta `json:"metadata"`
		Spec       struct {
			ForwardAuth struct {
				Address             string   `json:"address"`
				TrustForwardHeader  bool     `json:"trustForwardHeader"`
				AuthResponseHeaders []string `json:"authResponseHeaders"`
			} `json:"forwardAuth"`
		} `json:"spec"`
	}
	if err := yaml.UnmarshalStrict(read("traefik-middleware.yaml"), &mw); err != nil {
		t.Fatal(err)
	}
	fa := mw.Spec.ForwardAuth
	if mw.APIVersion != "traefik.io/v1alpha1" || mw.Kind != "Middleware" || !strings.HasSuffix(fa.Address, ":9192/traefik") ||
		fa.TrustForwardHeader || len(fa.AuthResponseHeaders) == 0 {
		t.Errorf("Traefik Middleware: %+v", mw)
	}
}
