package kube_test

// Tests against a real Kubernetes API server: the apiextensions-apiserver
// with an embedded etcd, inside go test, serving the CRDs that
// controller-gen generated. Decisions are checked through the real Check
// server after each change. Every test of this package shares one API
// server and etcd (the first compile of their code is long: keep them in
// this one package).

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	"k8s.io/apiextensions-apiserver/test/integration/fixtures"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/storage/etcd3/testserver"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/yaml"

	"github.com/tokenauthz/tokenauthz/api/v1alpha1"
	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/authz/kube"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// cluster is an API server behind a TCP proxy: the proxy's address stays
// while the server behind it is stopped and started again.
type cluster struct {
	t       *testing.T
	prefix  string
	proxy   *proxy
	stop    func()
	backend *rest.Config
	cfg     *rest.Config // through the proxy
	dyn     dynamic.Interface
}

var (
	sharedOnce sync.Once
	shared     *cluster
	sharedErr  error
)

// TestMain runs an etcd for the package.
func TestMain(m *testing.M) {
	os.Exit(m.Run())
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("a Kubernetes API server: not in -short")
	}
	etcd := testserver.NewTestConfig(t)
	testserver.RunEtcd(t, etcd)
	t.Setenv("KUBE_INTEGRATION_ETCD_URL", etcd.ListenClientUrls[0].String())
	c := &cluster{t: t, prefix: "/tokenauthz-" + strings.ToLower(t.Name())}
	c.startBackend()
	c.proxy = newProxy(t, c.backend)
	// Clients reach the proxy, which holds the server's credentials.
	c.cfg = &rest.Config{Host: "https://" + c.proxy.addr, TLSClientConfig: rest.TLSClientConfig{Insecure: true}}
	var err error
	if c.dyn, err = dynamic.NewForConfig(c.cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.proxy.close(); c.stop() })
	c.installCRDs()
	return c
}

func (c *cluster) startBackend() {
	stop, cfg, _, err := fixtures.StartDefaultServer(c.t, "--etcd-prefix", c.prefix)
	if err != nil {
		c.t.Fatal(err)
	}
	c.stop, c.backend = stop, cfg
}

// restart stops the API server (the proxy refuses connections meanwhile)
// and starts a new one on the same etcd data.
func (c *cluster) restart(while func()) {
	c.proxy.pause()
	c.stop()
	while()
	c.startBackend()
	c.proxy.resume(c.backend)
}

func hostOf(h string) string {
	h = strings.TrimPrefix(strings.TrimPrefix(h, "https://"), "http://")
	return strings.TrimSuffix(h, "/")
}

func (c *cluster) installCRDs() {
	ext, err := clientset.NewForConfig(c.cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	files, _ := filepath.Glob("../../deploy/kubernetes/crds/tokenauthz.io_*.yaml")
	if len(files) != 3 {
		c.t.Fatalf("want the 3 generated CRDs, found %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			c.t.Fatal(err)
		}
		var crd apiextensionsv1.CustomResourceDefinition
		if err := yaml.UnmarshalStrict(b, &crd); err != nil {
			c.t.Fatalf("%s: %v", f, err)
		}
		if _, err := ext.ApiextensionsV1().CustomResourceDefinitions().Create(context.Background(), &crd, metav1.CreateOptions{}); err != nil {
			c.t.Fatalf("%s: %v", f, err)
		}
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		name = name[strings.IndexByte(name, '_')+1:] + "." + name[:strings.IndexByte(name, '_')]
		eventually(c.t, "CRD "+name+" established", func() bool {
			crd, err := ext.ApiextensionsV1().CustomResourceDefinitions().Get(context.Background(), name, metav1.GetOptions{})
			if err != nil {
				return false
			}
			for _, cond := range crd.Status.Conditions {
				if cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue {
					return true
				}
			}
			return false
		})
	}
	time.Sleep(2 * time.Second) // a CR created within 2 s of Established waits that long anyway
}

// apply creates or updates an object from YAML; it returns the API
// server's error (a refused object).
func (c *cluster) apply(doc string) error {
	var u unstructured.Unstructured
	if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
		c.t.Fatal(err)
	}
	res := c.resource(&u)
	// The pods write status meanwhile: an update that lost that race is
	// retried on the newer version.
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := res.Get(context.Background(), u.GetName(), metav1.GetOptions{})
		if err == nil {
			u.SetResourceVersion(cur.GetResourceVersion())
			_, err = res.Update(context.Background(), &u, metav1.UpdateOptions{})
			return err
		}
		_, err = res.Create(context.Background(), &u, metav1.CreateOptions{})
		return err
	})
}

func (c *cluster) delete(kind, ns, name string) {
	gvr := map[string]schema.GroupVersionResource{"TokenPolicy": v1alpha1.TokenPolicies, "TokenIssuer": v1alpha1.TokenIssuers,
		"ClusterTokenIssuer": v1alpha1.ClusterTokenIssuers}[kind]
	var err error
	if ns == "" {
		err = c.dyn.Resource(gvr).Delete(context.Background(), name, metav1.DeleteOptions{})
	} else {
		err = c.dyn.Resource(gvr).Namespace(ns).Delete(context.Background(), name, metav1.DeleteOptions{})
	}
	if err != nil {
		c.t.Fatal(err)
	}
}

func (c *cluster) resource(u *unstructured.Unstructured) dynamic.ResourceInterface {
	gvr := map[string]schema.GroupVersionResource{"TokenPolicy": v1alpha1.TokenPolicies, "TokenIssuer": v1alpha1.TokenIssuers,
		"ClusterTokenIssuer": v1alpha1.ClusterTokenIssuers}[u.GetKind()]
	if u.GetNamespace() == "" {
		return c.dyn.Resource(gvr)
	}
	return c.dyn.Resource(gvr).Namespace(u.GetNamespace())
}

// accepted is a policy's Accepted condition: status, reason, message, and
// the generation it describes.
func (c *cluster) accepted(ns, name string) (status, reason, message string, observed, generation int64) {
	u, err := c.dyn.Resource(v1alpha1.TokenPolicies).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return "", "", err.Error(), 0, 0
	}
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, cond := range conds {
		m, _ := cond.(map[string]any)
		if m["type"] == "Accepted" {
			og, _ := m["observedGeneration"].(int64)
			return fmt.Sprint(m["status"]), fmt.Sprint(m["reason"]), fmt.Sprint(m["message"]), og, u.GetGeneration()
		}
	}
	return "", "", "", 0, u.GetGeneration()
}

// pod is one tokenauthz instance: a watcher of the cluster feeding a real
// Check server.
type pod struct {
	w      *kube.Watcher
	client authv3.AuthorizationClient
}

func startPod(t *testing.T, c *cluster, file *authz.Config, kc kube.Config) *pod {
	t.Helper()
	v, err := verify.New(file.Issuers, verify.Options{})
	if err != nil {
		t.Fatal(err)
	}
	base := *file
	base.RoutesFromResources = true
	srv, err := authz.NewServer(&base, v, nil)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	cur := v
	apply := func(s *kube.Snapshot) {
		mu.Lock()
		defer mu.Unlock()
		cfg := kube.Assemble(file, s)
		nv, err := cur.Reload(cfg.AllIssuers())
		if err != nil {
			t.Errorf("verifier: %v", err)
			return
		}
		if err := srv.Swap(cfg, nv); err != nil {
			t.Errorf("swap: %v", err)
			return
		}
		cur = nv
	}
	dyn, err := dynamic.NewForConfig(c.cfg)
	if err != nil {
		t.Fatal(err)
	}
	w := kube.NewWatcher(dyn, kc, file, apply, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go w.Run(ctx)
	eventually(t, "first sync", w.Synced)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	authv3.RegisterAuthorizationServer(gs, srv)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &pod{w: w, client: authv3.NewAuthorizationClient(conn)}
}

// code is the decision for GET path on host with token.
func (p *pod) code(t *testing.T, host, method, path, token string) codes.Code {
	t.Helper()
	h := map[string]string{":method": method, ":authority": host, ":path": path}
	if token != "" {
		h["authorization"] = "Bearer " + token
	}
	resp, err := p.client.Check(context.Background(), &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: method, Host: host, Path: path, Headers: h}},
		Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1"}}}},
	}})
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	return codes.Code(resp.GetStatus().GetCode())
}

func eventually(t *testing.T, what string, cond func() bool, state ...func() string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			for _, s := range state {
				what += "; " + s()
			}
			t.Fatalf("not within 20s: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// within2s asserts a change reaches decisions within 2 s (the issue's
// bound): it polls, it does not time the machine.
func within2s(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 2s: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

const platformIssuer = "https://sso.example.com"

func jwksOf(t *testing.T, keys ...*idptest.Key) string {
	var list []any
	for _, k := range keys {
		list = append(list, k.JWK(t))
	}
	b, err := json.Marshal(map[string]any{"keys": list})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func mint(t *testing.T, k *idptest.Key, iss, aud, scope string, extra map[string]any) string {
	c := map[string]any{"iss": iss, "aud": aud, "sub": "u1", "scope": scope, "exp": time.Now().Add(time.Hour).Unix(), "iat": time.Now().Unix()}
	for n, v := range extra {
		c[n] = v
	}
	return idptest.Mint(t, k, c)
}

// TestTokenPolicies is the whole life of team policies on a real API
// server: create, update, conflicts, delegation, invalid CEL with the last
// good generation kept, a schema violation refused, delete, the API server
// gone and back, and several pods writing one status.
func TestTokenPolicies(t *testing.T) {
	c := startCluster(t)
	sso := idptest.NewKey(t, "sso", "RS256")
	partner := idptest.NewKey(t, "partner", "ES256")
	// The platform's file config: a platform route for its own host, no
	// catch-all (requests to team hosts fall through to their policies).
	file := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "platform", Issuer: "https://platform.example", Audiences: []string{"api"},
			JWKS: jwksOf(t, sso), Algorithms: []string{"RS256"}}},
		Routes:  []authz.RouteConfig{{Name: "platform", Match: authz.Match{Host: "platform.example.com", PathPrefix: "/"}}},
		Headers: authz.ClaimHeaders(map[string]string{"x-user-id": "sub"}),
	}
	kc := kube.Config{Enabled: true, Namespaces: kube.Namespaces{All: true},
		HostDelegation: []kube.Delegation{{Namespaces: []string{"team-*"}, Hosts: []string{"*.example.com"}}}}
	a := startPod(t, c, file, kc)

	must := func(doc string) {
		t.Helper()
		if err := c.apply(doc); err != nil {
			t.Errorf("apply: %v\n%s", err, doc) // Errorf: also called from subtests
			runtime.Goexit()
		}
	}
	must(fmt.Sprintf(`
apiVersion: tokenauthz.io/v1alpha1
kind: ClusterTokenIssuer
metadata: { name: corp-sso }
spec: { issuer: %q, audiences: [api], algorithms: [RS256], jwks: '%s' }
`, platformIssuer, jwksOf(t, sso)))
	must(fmt.Sprintf(`
apiVersion: tokenauthz.io/v1alpha1
kind: TokenIssuer
metadata: { name: partner, namespace: team-orders }
spec: { issuer: https://partner.example, audiences: [orders], algorithms: [ES256], jwks: '%s' }
`, jwksOf(t, partner)))
	orders := `
apiVersion: tokenauthz.io/v1alpha1
kind: TokenPolicy
metadata: { name: orders, namespace: team-orders }
spec:
  hosts: [orders.example.com, orders.team-orders.svc.cluster.local]
  issuers: [corp-sso, partner]
  routes:
    - name: read
      match: { path_prefix: /orders, methods: [GET] }
      scopes: [%s]
    - name: write
      match: { path_prefix: /orders }
      when: ["%s"]
`
	must(fmt.Sprintf(orders, "orders:read", "'orders-writer' in claims.roles"))
	reader := mint(t, sso, platformIssuer, "api", "orders:read", nil)
	writer := mint(t, sso, platformIssuer, "api", "", map[string]any{"roles": []any{"orders-writer"}})
	partnerTok := mint(t, partner, "https://partner.example", "orders", "orders:read", nil)
	platformTok := mint(t, sso, "https://platform.example", "api", "orders:read", nil)

	t.Run("create", func(t *testing.T) {
		within2s(t, "the new policy decides", func() bool { return a.code(t, "orders.example.com", "GET", "/orders/1", reader) == codes.OK })
		for _, tc := range []struct {
			host, method, path, tok string
			want                    codes.Code
		}{
			{"orders.team-orders.svc.cluster.local", "GET", "/orders/1", reader, codes.OK},
			{"orders.example.com", "GET", "/orders/1", partnerTok, codes.OK},               // the team's own issuer
			{"orders.example.com", "GET", "/orders/1", platformTok, codes.Unauthenticated}, // a file issuer the policy does not name
			{"orders.example.com", "POST", "/orders", writer, codes.OK},
			{"orders.example.com", "POST", "/orders", reader, codes.PermissionDenied},
			{"orders.example.com", "GET", "/orders/1", "", codes.Unauthenticated},
			{"orders.example.com", "GET", "/admin", reader, codes.PermissionDenied},   // no route in the policy
			{"other.example.com", "GET", "/orders/1", reader, codes.PermissionDenied}, // no policy for the host
			{"platform.example.com", "GET", "/x", platformTok, codes.OK},
			{"platform.example.com", "GET", "/x", partnerTok, codes.Unauthenticated}, // a team's issuer is never the platform's
		} {
			if got := a.code(t, tc.host, tc.method, tc.path, tc.tok); got != tc.want {
				t.Errorf("%s %s%s: %v, want %v", tc.method, tc.host, tc.path, got, tc.want)
			}
		}
		eventually(t, "status Accepted", func() bool {
			st, reason, _, og, gen := c.accepted("team-orders", "orders")
			return st == "True" && reason == "Accepted" && og == gen
		})
	})

	t.Run("update", func(t *testing.T) {
		must(fmt.Sprintf(orders, "orders:list", "'orders-writer' in claims.roles"))
		within2s(t, "the update decides", func() bool {
			return a.code(t, "orders.example.com", "GET", "/orders/1", reader) == codes.PermissionDenied
		})
	})

	t.Run("invalid CEL keeps the last good generation", func(t *testing.T) {
		must(fmt.Sprintf(orders, "orders:read", "claims.roles.exists(r, r ==)"))
		eventually(t, "status InvalidRoute with line:column", func() bool {
			st, reason, msg, og, gen := c.accepted("team-orders", "orders")
			return st == "False" && reason == "InvalidRoute" && strings.Contains(msg, "1:") && strings.Contains(msg, "routes[1].when[0]") && og == gen
		})
		// The previous generation (orders:list) is still in force.
		if got := a.code(t, "orders.example.com", "GET", "/orders/1", reader); got != codes.PermissionDenied {
			t.Errorf("after an invalid update: %v, want the last good generation's 403", got)
		}
		if got := a.code(t, "orders.example.com", "POST", "/orders", writer); got != codes.OK {
			t.Errorf("after an invalid update, the last good write route: %v", got)
		}
		must(fmt.Sprintf(orders, "orders:read", "'orders-writer' in claims.roles"))
		within2s(t, "fixed", func() bool { return a.code(t, "orders.example.com", "GET", "/orders/1", reader) == codes.OK })
	})

	t.Run("host conflict and delegation", func(t *testing.T) {
		must(`
apiVersion: tokenauthz.io/v1alpha1
kind: TokenPolicy
metadata: { name: grab, namespace: team-evil }
spec:
  hosts: [orders.example.com, evil.example.com]
  issuers: [corp-sso]
  routes: [{ name: all, match: { path_prefix: / } }]
`)
		must(`
apiVersion: tokenauthz.io/v1alpha1
kind: TokenPolicy
metadata: { name: outside, namespace: other }
spec:
  hosts: [outside.example.com]
  issuers: [corp-sso]
  routes: [{ name: all, match: { path_prefix: / } }]
`)
		eventually(t, "HostConflict", func() bool {
			st, reason, msg, _, _ := c.accepted("team-evil", "grab")
			return st == "False" && reason == "HostConflict" && strings.Contains(msg, "team-orders/orders")
		}, func() string {
			st, reason, msg, _, _ := c.accepted("team-evil", "grab")
			return st + " " + reason + " " + msg
		})
		eventually(t, "HostNotDelegated", func() bool {
			st, reason, _, _, _ := c.accepted("other", "outside")
			return st == "False" && reason == "HostNotDelegated"
		}, func() string {
			st, reason, msg, _, _ := c.accepted("other", "outside")
			return st + " " + reason + " " + msg
		})
		// The older policy keeps its host; the refused ones open nothing.
		if got := a.code(t, "orders.example.com", "GET", "/admin", reader); got != codes.PermissionDenied {
			t.Errorf("a younger policy weakened an older one's host: %v", got)
		}
		for _, h := range []string{"evil.example.com", "outside.example.com"} {
			if got := a.code(t, h, "GET", "/x", reader); got != codes.PermissionDenied {
				t.Errorf("%s served by a refused policy: %v", h, got)
			}
		}
	})

	t.Run("schema violations are refused by the API server", func(t *testing.T) {
		for _, bad := range []string{
			`{ hosts: [a.team-orders.svc], issuers: [corp-sso], routes: [{ name: r, sender_constraint: sometimes }] }`,
			`{ hosts: [a.team-orders.svc], issuers: [corp-sso], routes: [{ name: r, match: { path: /a, path_prefix: /b } }] }`,
			`{ hosts: [a.team-orders.svc], issuers: [corp-sso], routes: [{ name: r, anonymous: true, allow_missing: true }] }`,
			`{ hosts: ["Bad Host"], issuers: [corp-sso], routes: [{ name: r }] }`,
			`{ hosts: [a.team-orders.svc], issuers: [corp-sso], routes: [] }`,
			`{ hosts: [a.team-orders.svc], routes: [{ name: r }] }`,
		} {
			err := c.apply("apiVersion: tokenauthz.io/v1alpha1\nkind: TokenPolicy\nmetadata: { name: bad, namespace: team-orders }\nspec: " + bad)
			if err == nil {
				t.Errorf("the API server took %s", bad)
				c.delete("TokenPolicy", "team-orders", "bad")
			}
		}
		if err := c.apply(`
apiVersion: tokenauthz.io/v1alpha1
kind: TokenIssuer
metadata: { name: plain, namespace: team-orders }
spec: { issuer: http://insecure.example, jwks: '{}' }
`); err == nil {
			t.Error("the API server took a TokenIssuer over http")
		}
	})

	t.Run("several pods, one status", func(t *testing.T) {
		b := startPod(t, c, file, kc)
		within2s(t, "the second pod decides", func() bool { return b.code(t, "orders.example.com", "GET", "/orders/1", reader) == codes.OK })
		writes := a.w.StatusWrites.Load() + b.w.StatusWrites.Load()
		u, _ := c.dyn.Resource(v1alpha1.TokenPolicies).Namespace("team-orders").Get(context.Background(), "orders", metav1.GetOptions{})
		rv := u.GetResourceVersion()
		// Nudge both pods to rebuild (a new policy elsewhere): neither
		// rewrites a status that is already right.
		must(`
apiVersion: tokenauthz.io/v1alpha1
kind: TokenPolicy
metadata: { name: billing, namespace: team-billing }
spec:
  hosts: [billing.team-billing.svc.cluster.local]
  issuers: [corp-sso]
  routes: [{ name: all, match: { path_prefix: / } }]
`)
		eventually(t, "both pods serve billing", func() bool {
			return a.code(t, "billing.team-billing.svc.cluster.local", "GET", "/", reader) == codes.OK &&
				b.code(t, "billing.team-billing.svc.cluster.local", "GET", "/", reader) == codes.OK
		})
		eventually(t, "billing accepted", func() bool { st, _, _, _, _ := c.accepted("team-billing", "billing"); return st == "True" })
		time.Sleep(500 * time.Millisecond)
		u, _ = c.dyn.Resource(v1alpha1.TokenPolicies).Namespace("team-orders").Get(context.Background(), "orders", metav1.GetOptions{})
		if u.GetResourceVersion() != rv {
			t.Errorf("an unchanged policy's status was rewritten: resourceVersion %s → %s", rv, u.GetResourceVersion())
		}
		// billing's status: written once (by whichever pod came first).
		if got := a.w.StatusWrites.Load() + b.w.StatusWrites.Load() - writes; got > 2 {
			t.Errorf("%d status writes for one new policy across two pods", got)
		}
	})

	t.Run("API server stopped and restarted", func(t *testing.T) {
		c.restart(func() {
			// Pods keep deciding with what they have.
			if got := a.code(t, "orders.example.com", "GET", "/orders/1", reader); got != codes.OK {
				t.Errorf("while the API server is down: %v", got)
			}
		})
		must(fmt.Sprintf(orders, "orders:list", "'orders-writer' in claims.roles"))
		eventually(t, "a change after the restart reaches the pod", func() bool {
			return a.code(t, "orders.example.com", "GET", "/orders/1", reader) == codes.PermissionDenied
		})
	})

	t.Run("delete", func(t *testing.T) {
		c.delete("TokenPolicy", "team-orders", "orders")
		within2s(t, "a deleted policy's hosts are denied", func() bool {
			return a.code(t, "orders.team-orders.svc.cluster.local", "POST", "/orders", writer) == codes.PermissionDenied
		})
		// Its host is free now: the younger policy that wanted it gets it.
		eventually(t, "the conflict resolves", func() bool {
			st, _, _, _, _ := c.accepted("team-evil", "grab")
			return st == "True"
		})
	})
}

// proxy is an HTTPS reverse proxy in front of the API server, with the
// server's credentials: its address and the clients' settings stay while
// the server behind it is stopped and a new one (new certificate, new
// loopback token) started. pause cuts every connection and refuses new
// ones, as an API server that went away would.
type proxy struct {
	t       *testing.T
	addr    string
	mu      sync.Mutex
	backend http.RoundTripper
	host    string
	srv     *http.Server
}

func newProxy(t *testing.T, backend *rest.Config) *proxy {
	p := &proxy{t: t}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = lis.Addr().String()
	p.setBackend(backend)
	p.serve(lis)
	return p
}

func (p *proxy) setBackend(cfg *rest.Config) {
	rt, err := rest.TransportFor(cfg)
	if err != nil {
		p.t.Fatal(err)
	}
	p.mu.Lock()
	p.backend, p.host = rt, hostOf(cfg.Host)
	p.mu.Unlock()
}

func (p *proxy) serve(lis net.Listener) {
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			p.mu.Lock()
			host := p.host
			p.mu.Unlock()
			r.Out.URL.Scheme, r.Out.URL.Host = "https", host
			r.Out.Header.Del("Authorization")
		},
		Transport: roundTripper(func(r *http.Request) (*http.Response, error) {
			p.mu.Lock()
			rt := p.backend
			p.mu.Unlock()
			return rt.RoundTrip(r)
		}),
		FlushInterval: -1, // watches stream
	}
	srv := &http.Server{Handler: rp, ErrorLog: log.New(io.Discard, "", 0)}
	p.mu.Lock()
	p.srv = srv
	p.mu.Unlock()
	go func() { _ = srv.ServeTLS(lis, proxyCert, proxyKey) }()
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func (p *proxy) pause() {
	p.mu.Lock()
	srv := p.srv
	p.mu.Unlock()
	_ = srv.Close()
}

func (p *proxy) resume(backend *rest.Config) {
	p.setBackend(backend)
	var lis net.Listener
	var err error
	for range 50 {
		if lis, err = net.Listen("tcp", p.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		p.t.Fatal(err)
	}
	p.serve(lis)
}

func (p *proxy) close() { p.pause() }

// proxyCert and proxyKey are the proxy's self-signed certificate files.
var proxyCert, proxyKey string

func init() {
	dir, err := os.MkdirTemp("", "kubeproxy")
	if err != nil {
		panic(err)
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		panic(err)
	}
	kb, _ := x509.MarshalECPrivateKey(k)
	proxyCert, proxyKey = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	_ = os.WriteFile(proxyCert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	_ = os.WriteFile(proxyKey, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
}
