package kube

import (
	"strings"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tokenauthz/tokenauthz/api/v1alpha1"
	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
)

const testJWKS = `{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"k"}]}`

func policy(ns, name string, age int, gen int64, hosts []string, when string) *v1alpha1.TokenPolicy {
	r := v1alpha1.Route{Name: "all", Match: v1alpha1.Match{PathPrefix: "/"}}
	if when != "" {
		r.When = []apiextensionsv1.JSON{{Raw: []byte(`"` + when + `"`)}}
	}
	return &v1alpha1.TokenPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(ns + "/" + name), Generation: gen,
			CreationTimestamp: metav1.NewTime(time.Unix(1700000000+int64(age), 0))},
		Spec: v1alpha1.TokenPolicySpec{Hosts: hosts, Issuers: []string{"corp"}, Routes: []v1alpha1.Route{r}},
	}
}

func status(snap *Snapshot, ns, name string) ObjectStatus {
	for _, st := range snap.Status {
		if st.Namespace == ns && st.Name == name && st.Resource == v1alpha1.TokenPolicies {
			return st
		}
	}
	return ObjectStatus{}
}

// TestBuilder: delegation, conflicts (oldest wins), invalid updates keep
// the last accepted generation, deletions free hosts; deterministic.
func TestBuilder(t *testing.T) {
	file := &authz.Config{Issuers: []verify.IssuerConfig{{Name: "platform", Issuer: "https://platform.example", Audiences: []string{"api"},
		JWKS: testJWKS, Algorithms: []string{"ES256"}}}, RoutesFromResources: true}
	kc := &Config{Enabled: true, HostDelegation: []Delegation{{Namespaces: []string{"team-*"}, Hosts: []string{"*.example.com"}}}}
	corp := &v1alpha1.ClusterTokenIssuer{ObjectMeta: metav1.ObjectMeta{Name: "corp", UID: "corp"},
		Spec: v1alpha1.IssuerSpec{PublicIssuerSpec: v1alpha1.PublicIssuerSpec{Issuer: "https://corp.example", Audiences: []string{"api"}, JWKS: testJWKS, Algorithms: []string{"ES256"}}}}
	b := NewBuilder()
	orders := policy("team-orders", "orders", 0, 1, []string{"orders.example.com", "orders.team-orders.svc.cluster.local"}, "")
	grab := policy("team-evil", "grab", 10, 1, []string{"orders.example.com", "evil.example.com"}, "")
	outside := policy("other", "outside", 20, 1, []string{"outside.example.com"}, "")
	own := policy("other", "own", 30, 1, []string{"x.other.svc", "y.other.svc.cluster.local"}, "")
	objs := Objects{Policies: []*v1alpha1.TokenPolicy{grab, outside, orders, own}, ClusterIssuers: []*v1alpha1.ClusterTokenIssuer{corp}}
	snap := b.Build(file, kc, objs)
	if st := status(snap, "team-orders", "orders"); !st.Accepted {
		t.Fatalf("orders: %+v", st)
	}
	if st := status(snap, "team-evil", "grab"); st.Accepted || st.Reason != ReasonHostConflict || !strings.Contains(st.Message, "team-orders/orders") {
		t.Errorf("grab: %+v", st)
	}
	if st := status(snap, "other", "outside"); st.Accepted || st.Reason != ReasonHostNotDelegated {
		t.Errorf("outside: %+v", st)
	}
	if st := status(snap, "other", "own"); !st.Accepted {
		t.Errorf("own svc hosts: %+v", st)
	}
	if len(snap.Hosts) != 2 {
		t.Errorf("%d host policies served, want orders and own", len(snap.Hosts))
	}

	// An invalid update: the last accepted generation stays, status says why.
	bad := policy("team-orders", "orders", 0, 2, []string{"orders.example.com"}, "claims.x ==")
	objs.Policies = []*v1alpha1.TokenPolicy{grab, outside, bad, own}
	snap = b.Build(file, kc, objs)
	st := status(snap, "team-orders", "orders")
	if st.Accepted || st.Reason != ReasonInvalidRoute || !strings.Contains(st.Message, "routes[0].when[0]") ||
		!strings.Contains(st.Message, "1:") || !strings.Contains(st.Message, "generation 1 stays in force") {
		t.Errorf("invalid update: %+v", st)
	}
	if st := status(snap, "team-evil", "grab"); st.Reason != ReasonHostConflict {
		t.Errorf("the last good generation holds its hosts: grab %+v", st)
	}
	// An unknown issuer, likewise.
	unknown := policy("team-orders", "orders", 0, 3, []string{"orders.example.com"}, "")
	unknown.Spec.Issuers = []string{"nobody"}
	objs.Policies = []*v1alpha1.TokenPolicy{grab, outside, unknown, own}
	if st := status(b.Build(file, kc, objs), "team-orders", "orders"); st.Reason != ReasonIssuerNotFound || !strings.Contains(st.Message, "stays in force") {
		t.Errorf("unknown issuer: %+v", st)
	}
	// Deleted: its hosts are free; the younger policy gets them.
	objs.Policies = []*v1alpha1.TokenPolicy{grab, outside, own}
	snap = b.Build(file, kc, objs)
	if st := status(snap, "team-evil", "grab"); !st.Accepted {
		t.Errorf("after the delete, grab: %+v", st)
	}
	// Another team's issuer is not reachable by name.
	ti := &v1alpha1.TokenIssuer{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "mine", UID: "ti"},
		Spec: v1alpha1.PublicIssuerSpec{Issuer: "https://a.example", Audiences: []string{"a"}, JWKS: testJWKS, Algorithms: []string{"ES256"}}}
	steal := policy("team-b", "steal", 40, 1, []string{"s.team-b.svc"}, "")
	steal.Spec.Issuers = []string{"mine"}
	use := policy("team-a", "use", 41, 1, []string{"u.team-a.svc"}, "")
	use.Spec.Issuers = []string{"mine"}
	objs = Objects{Policies: []*v1alpha1.TokenPolicy{steal, use}, Issuers: []*v1alpha1.TokenIssuer{ti}, ClusterIssuers: []*v1alpha1.ClusterTokenIssuer{corp}}
	snap = NewBuilder().Build(file, kc, objs)
	if st := status(snap, "team-b", "steal"); st.Reason != ReasonIssuerNotFound {
		t.Errorf("team-b used team-a's issuer: %+v", st)
	}
	if st := status(snap, "team-a", "use"); !st.Accepted {
		t.Errorf("team-a's own issuer: %+v", st)
	}
}

// TestCovers: what a delegated pattern includes.
func TestCovers(t *testing.T) {
	for _, tc := range []struct {
		pat, host string
		want      bool
	}{
		{"*.example.com", "a.example.com", true}, {"*.example.com", "*.a.example.com", true}, {"*.example.com", "*.example.com", true},
		{"*.example.com", "example.com", false}, {"*.example.com", "aexample.com", false}, {"a.example.com", "a.example.com", true},
		{"a.example.com", "b.a.example.com", false}, {"*.x.svc", "x.svc", false},
	} {
		if got := covers(tc.pat, tc.host); got != tc.want {
			t.Errorf("covers(%q, %q) = %v", tc.pat, tc.host, got)
		}
	}
}

// TestTemplateIssuerResources: a team's TokenIssuer can be an issuer
// template (tenants listed or any), and its policies read tenant.
func TestTemplateIssuerResources(t *testing.T) {
	file := &authz.Config{Issuers: []verify.IssuerConfig{{Name: "platform", Issuer: "https://platform.example", Audiences: []string{"api"},
		JWKS: testJWKS, Algorithms: []string{"ES256"}}}, RoutesFromResources: true}
	kc := &Config{Enabled: true}
	ti := &v1alpha1.TokenIssuer{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "realms", UID: "ti"},
		Spec: v1alpha1.PublicIssuerSpec{IssuerTemplate: "https://sso.example.com/realms/{tenant}", Discovery: true,
			Tenants: &v1alpha1.Tenants{Allow: []string{"acme"}}, Audiences: []string{"a"}, Algorithms: []string{"ES256"}}}
	bad := ti.DeepCopy()
	bad.Name, bad.UID = "bad", "bad"
	bad.Spec.IssuerTemplate = "https://{tenant}/realms"
	use := policy("team-a", "use", 41, 1, []string{"u.team-a.svc"}, "request.path.startsWith('/' + tenant + '/')")
	use.Spec.Issuers = []string{"realms"}
	snap := NewBuilder().Build(file, kc, Objects{Policies: []*v1alpha1.TokenPolicy{use}, Issuers: []*v1alpha1.TokenIssuer{ti, bad}})
	if st := status(snap, "team-a", "use"); !st.Accepted {
		t.Errorf("a policy on a template issuer: %+v", st)
	}
	found := false
	for _, st := range snap.Status {
		if st.Name == "bad" {
			found = true
			if st.Accepted || !strings.Contains(st.Message, "issuer_template") {
				t.Errorf("a template whose placeholder is the whole host: %+v", st)
			}
		}
	}
	if !found {
		t.Error("no status for the bad issuer")
	}
}
