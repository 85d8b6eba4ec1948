package httpauthz_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/authz/httpauthz"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

const aud = "api"

// fixture: an IdP, a real Check server, and the HTTP endpoint in front of
// it on a loopback port.
type fixture struct {
	idp  *idptest.IdP
	key  *idptest.Key
	addr string // the HTTP endpoint
	dpop *dpopKey
}

func start(t *testing.T, hc httpauthz.Config) *fixture {
	t.Helper()
	key := idptest.NewKey(t, "k1", "RS256")
	idp := idptest.New(t, key)
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	downURL := "http://" + closed.Addr().String() + "/jwks"
	closed.Close()
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{
			{Name: "main", Issuer: idp.URL(), Audiences: []string{aud}, JWKSURI: idp.JWKSURL(), Algorithms: []string{"RS256"},
				DPoP: &verify.DPoPConfig{}},
			{Name: "down", Issuer: "http://down.example", Audiences: []string{aud}, JWKSURI: downURL, Algorithms: []string{"RS256"},
				Keys: verify.KeysConfig{AllowHTTP: true, Timeout: 200 * time.Millisecond}},
		},
		Routes: []authz.RouteConfig{
			{Name: "public", Match: authz.Match{PathPrefix: "/public"}, Anonymous: true},
			{Name: "admin", Match: authz.Match{PathPrefix: "/admin"}, Scopes: []string{"admin"}},
			{Name: "pay", Match: authz.Match{PathPrefix: "/pay"}, SenderConstraint: "required"},
			{Name: "mtls", Match: authz.Match{PathPrefix: "/mtls"}, SenderConstraint: "required"},
			{Name: "default", Match: authz.Match{PathPrefix: "/"}},
		},
		Headers: authz.ClaimHeaders(map[string]string{"x-user-id": "sub"}),
	}
	v, err := verify.New(cfg.Issuers, verify.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	v.Start(ctx)
	srv, err := authz.NewServer(cfg, v, nil)
	if err != nil {
		t.Fatal(err)
	}
	h, err := httpauthz.New(hc, srv, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := h.Server()
	go func() { _ = hs.Serve(lis) }()
	t.Cleanup(func() { _ = hs.Close() })
	deadline := time.Now().Add(10 * time.Second)
	for { // main's keys (the "down" issuer's never load)
		if _, ok := v.KeySetAges()["main"]; ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("main's keys did not load")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return &fixture{idp: idp, key: key, addr: lis.Addr().String(), dpop: newDPoPKey(t)}
}

func (f *fixture) token(t *testing.T, scope string, extra map[string]any) string {
	c := f.idp.Claims(aud)
	c["scope"] = scope
	for k, v := range extra {
		c[k] = v
	}
	return idptest.Mint(t, f.key, c)
}

// upstream echoes the headers it received as JSON.
func upstream(t *testing.T) *httptest.Server {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(r.Header)
	}))
	t.Cleanup(s.Close)
	return s
}

// startNginx runs a real nginx in front of up, asking the endpoint at
// authz with auth_request, configured as the README says.
func startNginx(t *testing.T, authz, up string) string {
	t.Helper()
	bin, err := exec.LookPath("nginx")
	if err != nil {
		if _, e := os.Stat("/usr/sbin/nginx"); e == nil {
			bin = "/usr/sbin/nginx"
		} else {
			t.Fatal("nginx is not installed (Debian's nginx-light; .ci/run installs it)")
		}
	}
	dir := t.TempDir()
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := lis.Addr().String()
	lis.Close()
	conf := fmt.Sprintf(`daemon off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
worker_processes 1;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path %[1]s/body; proxy_temp_path %[1]s/proxy; fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi; scgi_temp_path %[1]s/scgi;
  server {
    listen %[2]s;
%[4]s
  }
}
`, dir, addr, up, nginxLocations("http://"+authz, "http://"+up))
	if err := os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", filepath.Join(dir, "nginx.conf"), "-p", dir, "-e", filepath.Join(dir, "error.log"))
	// Its own process group: the workers go with the master.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); _ = cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "error.log"))
			t.Fatalf("nginx did not start: %s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// nginxLocations are the README's nginx locations (TestNginxSnippet holds
// the README to them).
func nginxLocations(authz, up string) string {
	return fmt.Sprintf(`    location / {
      auth_request /_tokenauthz;
      auth_request_set $authz_status $upstream_status;
      # Claim headers: set from the answer, or dropped (an empty value), so a
      # client's copy never reaches the upstream.
      auth_request_set $x_user_id $upstream_http_x_user_id;
      proxy_set_header X-User-Id $x_user_id;
      # nginx turns any status but 2xx, 401 and 403 into a 500: give the
      # client tokenauthz's 400, 429 and 503 instead.
      error_page 500 = @tokenauthz_error;
      proxy_pass %[2]s;
    }
    location = /_tokenauthz {
      internal;
      proxy_pass %[1]s/nginx;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }
    location @tokenauthz_error {
      if ($authz_status = 400) { return 400; }
      if ($authz_status = 429) { return 429; }
      if ($authz_status = 503) { return 503; }
      return 500;
    }`, authz, up)
}

func get(t *testing.T, url string, h map[string]string) (*http.Response, map[string][]string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	for k, v := range h {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var echoed map[string][]string
	if resp.StatusCode == http.StatusOK {
		_ = json.Unmarshal(b, &echoed)
	}
	return resp, echoed
}

// TestThroughNginx: a real nginx with auth_request in front of a test
// upstream, configured as the README says.
func TestThroughNginx(t *testing.T) {
	if testing.Short() {
		t.Skip("runs nginx: not in -short")
	}
	f := start(t, httpauthz.Config{})
	up := upstream(t)
	ng := "http://" + startNginx(t, f.addr, strings.TrimPrefix(up.URL, "http://"))
	tok := f.token(t, "read", nil)

	// Allow: the claim header reaches the upstream; the client's copy does not.
	resp, echoed := get(t, ng+"/orders/1", map[string]string{"Authorization": "Bearer " + tok, "X-User-Id": "root"})
	if want := f.idp.Claims(aud)["sub"]; resp.StatusCode != 200 || len(echoed["X-User-Id"]) != 1 || echoed["X-User-Id"][0] != want {
		t.Fatalf("allow: %d, upstream saw X-User-Id %v, want only %v", resp.StatusCode, echoed["X-User-Id"], want)
	}
	// An anonymous route: no claim header at all, the client's dropped.
	resp, echoed = get(t, ng+"/public/x", map[string]string{"X-User-Id": "root"})
	if resp.StatusCode != 200 || len(echoed["X-User-Id"]) != 0 {
		t.Fatalf("anonymous: %d, upstream saw X-User-Id %v", resp.StatusCode, echoed["X-User-Id"])
	}
	// 401 with WWW-Authenticate at the client.
	resp, _ = get(t, ng+"/orders/1", nil)
	if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer realm=") {
		t.Fatalf("no token: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	resp, _ = get(t, ng+"/orders/1", map[string]string{"Authorization": "Bearer " + tok[:len(tok)-4] + "AAAA"})
	if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
		t.Fatalf("bad token: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	// 403: a scope missing.
	if resp, _ = get(t, ng+"/admin/x", map[string]string{"Authorization": "Bearer " + tok}); resp.StatusCode != 403 {
		t.Fatalf("missing scope: %d", resp.StatusCode)
	}
	// 400: a path without one meaning, judged on nginx's raw $request_uri.
	for _, p := range []string{"/public/..;/admin/x", "/public/%2e%2e/admin", "/ADMIN/x"} {
		if resp, _ = get(t, ng+p, map[string]string{"Authorization": "Bearer " + tok}); resp.StatusCode != 400 {
			t.Errorf("%s: %d, want 400", p, resp.StatusCode)
		}
	}
	// 503: the issuer's keys cannot be had.
	down := idptest.Mint(t, f.key, map[string]any{"iss": "http://down.example", "aud": aud, "sub": "u", "exp": time.Now().Add(time.Hour).Unix()})
	if resp, _ = get(t, ng+"/orders/1", map[string]string{"Authorization": "Bearer " + down}); resp.StatusCode != 503 {
		t.Errorf("undecidable: %d, want 503", resp.StatusCode)
	}
	// DPoP through nginx: htu from the forwarded scheme, host and URI.
	bound := f.token(t, "read", map[string]any{"cnf": map[string]any{"jkt": f.dpop.jkt}})
	proof := f.dpop.proof(t, "GET", ng+"/pay/1", bound)
	if resp, _ = get(t, ng+"/pay/1", map[string]string{"Authorization": "DPoP " + bound, "DPoP": proof}); resp.StatusCode != 200 {
		t.Errorf("DPoP through nginx: %d", resp.StatusCode)
	}
	if resp, _ = get(t, ng+"/pay/1", map[string]string{"Authorization": "DPoP " + bound, "DPoP": f.dpop.proof(t, "GET", ng+"/pay/2", bound)}); resp.StatusCode != 401 {
		t.Errorf("DPoP proof for another URI: %d", resp.StatusCode)
	}
}

// TestEnvoyAndTraefikShapes: requests built as Envoy's http_service and
// Traefik's forwardAuth send them, through the real listener.
func TestEnvoyAndTraefikShapes(t *testing.T) {
	f := start(t, httpauthz.Config{})
	tok := f.token(t, "read", nil)
	base := "http://" + f.addr
	do := func(method, url string, h map[string]string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(method, url, nil)
		for k, v := range h {
			if k == "Host" {
				req.Host = v
				continue
			}
			req.Header.Add(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	// Envoy: the original method and path after the prefix, the original
	// authority as Host; allow names the headers to remove.
	resp := do("POST", base+"/envoy/orders/1?x=1", map[string]string{"Host": "api.example.com", "Authorization": "Bearer " + tok, "X-User-Id": "root"})
	if resp.StatusCode != 200 || resp.Header.Get("X-User-Id") != fmt.Sprint(f.idp.Claims(aud)["sub"]) {
		t.Fatalf("envoy allow: %d %v", resp.StatusCode, resp.Header)
	}
	if resp = do("GET", base+"/envoy/admin/x", map[string]string{"Host": "api.example.com", "Authorization": "Bearer " + tok}); resp.StatusCode != 403 {
		t.Errorf("envoy 403: %d", resp.StatusCode)
	}
	resp = do("GET", base+"/envoy/public/x", map[string]string{"Host": "api.example.com", "Authorization": "Bearer x"})
	if resp.StatusCode != 200 || !strings.Contains(resp.Header.Get("X-Envoy-Auth-Headers-To-Remove"), "authorization") ||
		!strings.Contains(resp.Header.Get("X-Envoy-Auth-Headers-To-Remove"), "x-user-id") {
		t.Errorf("envoy anonymous: %d, remove %q", resp.StatusCode, resp.Header.Get("X-Envoy-Auth-Headers-To-Remove"))
	}
	if resp = do("GET", base+"/envoy/orders/1", map[string]string{"Host": "api.example.com"}); resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
		t.Errorf("envoy 401: %d", resp.StatusCode)
	}
	// Traefik: X-Forwarded-Method, -Proto, -Host, -Uri, -For.
	tr := func(method, uri string, h map[string]string) *http.Response {
		m := map[string]string{"X-Forwarded-Method": method, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com",
			"X-Forwarded-Uri": uri, "X-Forwarded-For": "203.0.113.5"}
		for k, v := range h {
			m[k] = v
		}
		return do("GET", base+"/traefik", m)
	}
	if resp = tr("DELETE", "/orders/1", map[string]string{"Authorization": "Bearer " + tok}); resp.StatusCode != 200 || resp.Header.Get("X-User-Id") != fmt.Sprint(f.idp.Claims(aud)["sub"]) {
		t.Errorf("traefik allow: %d", resp.StatusCode)
	}
	if resp = tr("GET", "/orders/1", nil); resp.StatusCode != 401 {
		t.Errorf("traefik 401: %d", resp.StatusCode)
	}
	if resp = tr("GET", "/public/..;/admin", map[string]string{"Authorization": "Bearer " + tok}); resp.StatusCode != 400 {
		t.Errorf("traefik 400: %d", resp.StatusCode)
	}
	// ingress-nginx's auth-url shape: X-Original-URL and X-Original-Method.
	in := func(url string, h map[string]string) *http.Response {
		m := map[string]string{"X-Original-URL": url, "X-Original-Method": "GET", "X-Forwarded-For": "203.0.113.5"}
		for k, v := range h {
			m[k] = v
		}
		return do("GET", base+"/nginx", m)
	}
	if resp = in("https://api.example.com/orders/1?a=b", map[string]string{"Authorization": "Bearer " + tok}); resp.StatusCode != 200 {
		t.Errorf("ingress-nginx allow: %d", resp.StatusCode)
	}
	if resp = in("https://api.example.com/admin/x", map[string]string{"Authorization": "Bearer " + tok}); resp.StatusCode != 403 {
		t.Errorf("ingress-nginx 403: %d", resp.StatusCode)
	}
	if resp = in("api.example.com/x", nil); resp.StatusCode != 403 {
		t.Errorf("a malformed X-Original-URL: %d", resp.StatusCode)
	}
	// Not a recognizable shape, or a shape's header missing or repeated: 403.
	for _, r := range []*http.Response{
		do("GET", base+"/other", nil),
		do("GET", base+"/nginx", map[string]string{"X-Original-Method": "GET", "X-Forwarded-Host": "a"}),
		tr("GET", "/x", map[string]string{"X-Forwarded-Method": ""}),
	} {
		if r.StatusCode != 403 {
			t.Errorf("%s: %d, want 403", r.Request.URL, r.StatusCode)
		}
	}
	req, _ := http.NewRequest("GET", base+"/nginx", nil)
	req.Header.Add("X-Original-URI", "/public/x")
	req.Header.Add("X-Original-URI", "/admin/x")
	req.Header.Set("X-Original-Method", "GET")
	req.Header.Set("X-Forwarded-Host", "a")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 403 {
		t.Errorf("a repeated X-Original-URI: %v %v", resp, err)
	}

	// h2c: HTTP/2 with prior knowledge, as Envoy can call it.
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	h2 := &http.Client{Transport: &http.Transport{Protocols: p}}
	req, _ = http.NewRequest("GET", base+"/envoy/orders/1", nil)
	req.Host = "api.example.com"
	req.Header.Set("Authorization", "Bearer "+tok)
	if resp, err := h2.Do(req); err != nil || resp.StatusCode != 200 || resp.ProtoMajor != 2 {
		t.Errorf("h2c: %v %v", resp, err)
	}
}

// TestUntrustedCallerRefused: only trusted_proxies may call; others get a
// 403 that says so, before anything is read.
func TestUntrustedCallerRefused(t *testing.T) {
	f := start(t, httpauthz.Config{TrustedProxies: []string{"10.0.0.0/8"}})
	req, _ := http.NewRequest("GET", "http://"+f.addr+"/envoy/public/x", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 403 || !strings.Contains(string(b), "trusted_proxies") {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	if _, err := httpauthz.New(httpauthz.Config{Proxies: []string{"haproxy"}, TrustedProxies: []string{"nope"}}, nil, nil, nil); err == nil ||
		!strings.Contains(err.Error(), "proxies[0]") || !strings.Contains(err.Error(), "trusted_proxies[0]") {
		t.Errorf("a bad config: %v", err)
	}
}

// dpopKey is a DPoP client key for the tests.
type dpopKey struct {
	key *ecdsa.PrivateKey
	jwk map[string]any
	jkt string
}

func newDPoPKey(t *testing.T) *dpopKey {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pub, err := jwk.FromRaw(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(pub)
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	tp, _ := pub.Thumbprint(crypto.SHA256)
	return &dpopKey{key: k, jwk: m, jkt: base64.RawURLEncoding.EncodeToString(tp)}
}

func (d *dpopKey) proof(t *testing.T, method, htu, token string) string {
	sum := sha256.Sum256([]byte(token))
	return idptest.Sign(t, "ES256", d.key, map[string]any{"typ": "dpop+jwt", "alg": "ES256", "jwk": d.jwk},
		map[string]any{"jti": fmt.Sprint(time.Now().UnixNano()), "htm": method, "htu": htu, "iat": time.Now().Unix(),
			"ath": base64.RawURLEncoding.EncodeToString(sum[:])})
}

// TestNginxSnippet: the README's nginx locations are the ones
// TestThroughNginx runs.
func TestNginxSnippet(t *testing.T) {
	b, err := os.ReadFile("../../docs/http-endpoint.md")
	if err != nil {
		t.Fatal(err)
	}
	if want := nginxLocations("http://tokenauthz:9192", "http://app"); !strings.Contains(string(b), want) {
		t.Errorf("the README's nginx snippet is not the tested one:\n%s", want)
	}
}

// TestClientCertificates: a certificate-bound token (RFC 8705) is checked
// against the certificate nginx ($ssl_client_escaped_cert) or Traefik
// (passTLSClientCert, pem: true) forwards.
func TestClientCertificates(t *testing.T) {
	f := start(t, httpauthz.Config{})
	derA, derB := selfSigned(t), selfSigned(t)
	sum := sha256.Sum256(derA)
	tok := f.token(t, "read", map[string]any{"cnf": map[string]any{"x5t#S256": base64.RawURLEncoding.EncodeToString(sum[:])}})
	pemOf := func(der []byte) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	}
	call := func(shape string, h map[string]string) int {
		req, _ := http.NewRequest("GET", "http://"+f.addr+"/"+shape, nil)
		if shape == "nginx" {
			req.Header.Set("X-Original-URI", "/mtls/1")
			req.Header.Set("X-Original-Method", "GET")
		} else {
			req.Header.Set("X-Forwarded-Uri", "/mtls/1")
			req.Header.Set("X-Forwarded-Method", "GET")
			req.Header.Set("X-Forwarded-Proto", "https")
		}
		req.Header.Set("X-Forwarded-Host", "api.example.com")
		req.Header.Set("Authorization", "Bearer "+tok)
		for k, v := range h {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, tc := range []struct {
		shape, header string
		value         func([]byte) string
	}{
		{"nginx", "X-SSL-Client-Cert", func(der []byte) string { return url.QueryEscape(pemOf(der)) }},
		{"traefik", "X-Forwarded-Tls-Client-Cert", func(der []byte) string { return url.QueryEscape(base64.StdEncoding.EncodeToString(der)) }},
	} {
		if got := call(tc.shape, map[string]string{tc.header: tc.value(derA)}); got != 200 {
			t.Errorf("%s, the bound certificate: %d", tc.shape, got)
		}
		if got := call(tc.shape, map[string]string{tc.header: tc.value(derB)}); got != 401 {
			t.Errorf("%s, another certificate: %d", tc.shape, got)
		}
		if got := call(tc.shape, nil); got != 401 {
			t.Errorf("%s, no certificate: %d", tc.shape, got)
		}
	}
}

func selfSigned(t *testing.T) []byte {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "client"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
