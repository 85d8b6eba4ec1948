package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection/grpc_reflection_v1"

	"github.com/tokenauthz/tokenauthz/deploy"
)

func TestValidateNamesEveryProblem(t *testing.T) {
	cfg := `
server: { grpc_addr: ":9191", log_format: xml }
issuers:
  - name: main
    issuer: https://issuer.example
    jwks_uri: http://issuer.example/jwks
    algoritms: [RS256]
    leeway: 10m
    requierd_claims: [sub]
    keys: { timeout: 5 }
routes:
  - { name: admin, match: { path_prefix: admin }, issuers: [nope], claims: { stt: {a: 1} } }
headers: { X-User: sub, authorization: sub }
`
	path := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := cli([]string{"validate", "--config", path}, &stdout, &stderr); code != 1 {
		t.Fatalf("exit %d, want 1; stderr: %s", code, stderr.String())
	}
	out := stderr.String()
	for _, want := range []string{
		path,
		"line 7: unknown key algoritms (did you mean algorithms?)",
		"line 9: unknown key requierd_claims (did you mean required_claims?)",
		`line 10: timeout: "5" is not a duration: durations need a unit`,
		"issuers[0].audiences: required",
		"issuers[0].jwks_uri: \"http://issuer.example/jwks\" is plain http",
		"issuers[0].algorithms: required",
		"issuers[0].leeway: must be between",
		"routes[0].match.path_prefix: the path must start with /",
		`routes[0].issuers[0]: no issuer named "nope"`,
		"routes[0].claims.stt: accepted values are strings, numbers or booleans",
		"headers.X-User: not a lower-case HTTP header name",
		"headers.authorization: this header cannot carry a claim",
		"server.log_format: must be json or text",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("validate output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "verify.") || strings.Contains(out, "main.") || strings.Contains(out, "time.Duration") {
		t.Errorf("validate names Go types:\n%s", out)
	}

	if code := cli([]string{"validate", "--config", filepath.Join(t.TempDir(), "missing.yaml")}, &stdout, &stderr); code != 1 {
		t.Errorf("missing file: exit %d", code)
	}
	empty := filepath.Join(t.TempDir(), "empty.yaml")
	_ = os.WriteFile(empty, nil, 0o600)
	stderr.Reset()
	if code := cli([]string{"validate", "--config", empty}, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), "empty") {
		t.Errorf("empty file: exit %d, %s", code, stderr.String())
	}
}

func TestServeRefusesInvalidConfig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bad.yaml")
	_ = os.WriteFile(path, []byte("issuers: []\nroutes: []\nunknown: 1\n"), 0o600)
	var stderr bytes.Buffer
	if code := cli([]string{"serve", "--config", path}, io.Discard, &stderr); code != 1 {
		t.Fatalf("serve on an invalid config: exit %d", code)
	}
	if !strings.Contains(stderr.String(), "unknown key unknown") {
		t.Errorf("stderr: %s", stderr.String())
	}
}

// TestDemoQuickstart is the README's first minute: serve on the embedded demo
// config, mint a demo token, get an allow with claim headers and a deny.
func TestDemoQuickstart(t *testing.T) {
	cfg, err := loadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Server.ShutdownTimeout = 5 * time.Second
	httpLis, _ := net.Listen("tcp", "127.0.0.1:0")
	svc := runService(t, cfg, nil, httpLis)
	conn, ctx := svc.conn, context.Background()

	var stdout bytes.Buffer
	if code := cli([]string{"demo-token", "--sub", "bob", "--scope", "read admin"}, &stdout, io.Discard); code != 0 {
		t.Fatal("demo-token failed")
	}
	token := strings.TrimSpace(stdout.String())

	// Ready once keys are loaded (inline keys: at once).
	hc := healthpb.NewHealthClient(conn)
	waitFor(t, func() bool {
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "readiness"})
		return err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING
	})
	if r, err := http.Get("http://" + httpLis.Addr().String() + "/readyz"); err != nil || r.StatusCode != 200 {
		t.Fatalf("/readyz: %v %v", r, err)
	}

	c := authv3.NewAuthorizationClient(conn)
	checkReq := func(path, auth string) *authv3.CheckResponse {
		h := map[string]string{":path": path}
		if auth != "" {
			h["authorization"] = auth
		}
		resp, err := c.Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
			Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: path, Host: "demo", Headers: h}}}})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	resp := checkReq("/admin/x", "Bearer "+token)
	if resp.GetStatus().GetCode() != int32(codes.OK) {
		t.Fatalf("demo token denied: %v", resp)
	}
	got := map[string]string{}
	for _, h := range resp.GetOkResponse().GetHeaders() {
		got[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	if got["x-user-id"] != "bob" || got["x-user-scopes"] != "read admin" {
		t.Errorf("claim headers %v", got)
	}
	if resp := checkReq("/orders", ""); resp.GetDeniedResponse().GetStatus().GetCode() != 401 {
		t.Errorf("no token: %v", resp)
	}

	// grpcurl finds the service through reflection.
	rc, err := grpc_reflection_v1.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = rc.Send(&grpc_reflection_v1.ServerReflectionRequest{MessageRequest: &grpc_reflection_v1.ServerReflectionRequest_ListServices{}})
	lr, err := rc.Recv()
	if err != nil || !strings.Contains(lr.String(), "envoy.service.auth.v3.Authorization") {
		t.Errorf("reflection does not list the Check service: %v %v", lr, err)
	}

	if err := svc.stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReadmeConfigExampleDecodes keeps the README's full example honest: it
// must decode strictly (no unknown or misspelled keys) and fail validation
// only for the files it names that this machine lacks.
func TestReadmeConfigExampleDecodes(t *testing.T) {
	readme, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(readme), "A full example:\n\n```yaml\n")
	if !ok {
		t.Fatal("README has no full config example")
	}
	example, _, _ := strings.Cut(rest, "```")
	_, err = parseConfig([]byte(example), "README example")
	if err == nil {
		return
	}
	for _, p := range err.(*configError).problems {
		if !strings.Contains(p, "no such file") {
			t.Errorf("README example: %s", p)
		}
	}
}

// service is the service running in this test process, as serve runs it.
type service struct {
	conn   *grpc.ClientConn // an insecure client of its gRPC port
	cancel context.CancelFunc
	once   sync.Once
	done   chan error
	err    error
}

// runService runs cfg on grpcLis (nil: a fresh loopback port) and httpLis
// (nil: no HTTP port), dials it, and stops it when the test ends.
func runService(t *testing.T, cfg *fileConfig, grpcLis, httpLis net.Listener, opts ...runOption) *service {
	t.Helper()
	if grpcLis == nil {
		var err error
		if grpcLis, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &service{cancel: cancel, done: make(chan error, 1)}
	go func() { s.done <- run(ctx, cfg, grpcLis, httpLis, newLogger("text", "error"), opts...) }()
	target := grpcLis.Addr().String()
	if grpcLis.Addr().Network() == "unix" {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	s.conn = conn
	t.Cleanup(func() {
		_ = conn.Close()
		if err := s.stop(); err != nil {
			t.Errorf("run: %v", err)
		}
	})
	return s
}

// stop ends the service (drain included) and returns run's error.
func (s *service) stop() error {
	s.once.Do(func() { s.cancel(); s.err = <-s.done })
	return s.err
}

// TestDemoDPoP is the README's DPoP try-out: a demo token bound to a key
// (made by demo-token --bind-key), a proof from dpop-proof, and Check on
// the demo config: allowed with the proof, refused as a bearer token, and
// a replayed proof refused.
func TestDemoDPoP(t *testing.T) {
	cfg, err := loadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	c := authv3.NewAuthorizationClient(runService(t, cfg, nil, nil).conn)
	keyFile := filepath.Join(t.TempDir(), "dpop-key.jwk")
	var out bytes.Buffer
	if code := cli([]string{"demo-token", "--bind-key", keyFile}, &out, io.Discard); code != 0 {
		t.Fatal("demo-token --bind-key failed")
	}
	tok := strings.TrimSpace(out.String())
	proof := func() string {
		out.Reset()
		var errOut bytes.Buffer
		if code := cli([]string{"dpop-proof", "--key", keyFile, "--method", "POST", "--url", "https://api.example.com/payments/1?x=1", "--token", tok}, &out, &errOut); code != 0 {
			t.Fatalf("dpop-proof failed: %s", errOut.String())
		}
		return strings.TrimSpace(out.String())
	}
	check := func(auth, proof string) codes.Code {
		h := map[string]string{"authorization": auth}
		if proof != "" {
			h["dpop"] = proof
		}
		resp, err := c.Check(context.Background(), &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
			Http: &authv3.AttributeContext_HttpRequest{Method: "POST", Path: "/payments/1", Host: "api.example.com", Scheme: "https", Headers: h}}}})
		if err != nil {
			t.Fatal(err)
		}
		return codes.Code(resp.GetStatus().GetCode())
	}
	waitFor(t, func() bool { return check("DPoP "+tok, proof()) == codes.OK })
	p := proof()
	if got := check("DPoP "+tok, p); got != codes.OK {
		t.Fatalf("with a proof: %v", got)
	}
	if got := check("DPoP "+tok, p); got != codes.Unauthenticated {
		t.Errorf("a replayed proof: %v", got)
	}
	if got := check("Bearer "+tok, ""); got != codes.Unauthenticated {
		t.Errorf("the bound token as a bearer token: %v", got)
	}
	// The plain demo token is refused on the route that requires binding.
	out.Reset()
	cli([]string{"demo-token"}, &out, io.Discard)
	if got := check("Bearer "+strings.TrimSpace(out.String()), ""); got != codes.Unauthenticated {
		t.Errorf("an unbound token on /payments: %v", got)
	}
}

// TestCLIRoughEdges: --help exits 0 everywhere; flag errors name flags;
// listen addresses are checked and a taken port says what to do.
func TestCLIRoughEdges(t *testing.T) {
	for _, cmd := range []string{"serve", "demo", "validate", "demo-token", "dpop-proof", "check", "revoke"} {
		var out, errOut bytes.Buffer
		if code := cli([]string{cmd, "--help"}, &out, &errOut); code != 0 {
			t.Errorf("%s --help: exit %d", cmd, code)
		}
		if !strings.Contains(errOut.String()+out.String(), "-") {
			t.Errorf("%s --help printed no flags", cmd)
		}
	}
	run := func(args ...string) (int, string) {
		var out, errOut bytes.Buffer
		code := cli(args, &out, &errOut)
		return code, out.String() + errOut.String()
	}
	// check: both --token and --token-file.
	tf := filepath.Join(t.TempDir(), "tok")
	_ = os.WriteFile(tf, []byte("x"), 0o600)
	if code, out := run("check", "--token", "x", "--token-file", tf); code != 2 || !strings.Contains(out, "not both") {
		t.Errorf("check with --token and --token-file: %d %q", code, out)
	}
	// revoke: flag names, and an admin address without a scheme.
	t.Setenv("TOKENAUTHZ_ADMIN_TOKEN", adminToken)
	if code, out := run("revoke", "--jti", "j1"); code != 2 || !strings.Contains(out, "--issuer") {
		t.Errorf("revoke --jti without --issuer: %d %q", code, out)
	}
	if code, out := run("revoke", "--token", "a", "--sub", "b", "--issuer", "main"); code != 2 || !strings.Contains(out, "exactly one of --token") {
		t.Errorf("revoke with two targets: %d %q", code, out)
	}
	var got string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.URL.Path
		w.WriteHeader(400)
		_, _ = w.Write([]byte(`{"error":"token_sha256: 64 lower-case hex digits (sha256sum of the token)"}`))
	}))
	defer srv.Close()
	code, out := run("revoke", "--admin", strings.TrimPrefix(srv.URL, "http://"), "--token-sha256", "zz")
	if code != 1 || got != "/admin/revoke" || !strings.Contains(out, "--token-sha256: 64") || strings.Contains(out, "token_sha256") {
		t.Errorf("revoke without a scheme, server error: %d %q (path %q)", code, out, got)
	}
	// Listen addresses.
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	_ = os.WriteFile(bad, []byte(strings.Replace(string(deploy.DemoConfig), "grpc_addr: 127.0.0.1:9191", "grpc_addr: 127.0.0.1", 1)), 0o600)
	if code, out := run("validate", "--config", bad); code != 1 || !strings.Contains(out, "server.grpc_addr") {
		t.Errorf("validate with a bad listen address: %d %q", code, out)
	}
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	if code, out := run("serve", "--grpc-addr", taken.Addr().String()); code != 1 || !strings.Contains(out, "port is taken") || !strings.Contains(out, "--grpc-addr") {
		t.Errorf("serve on a taken port: %d %q", code, out)
	}
}

// TestEffectiveConfigShowsDefaults: the start-up log shows the defaults in
// force, not zero values.
func TestEffectiveConfigShowsDefaults(t *testing.T) {
	cfg, err := loadConfig("")
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	logEffectiveConfig(slog.New(slog.NewJSONHandler(&buf, nil)), cfg)
	out := buf.String()
	for _, want := range []string{`"realm":"tokenauthz"`, `"timeout":"5s"`, `"max_bytes":67108864`, `"leeway":"30s"`,
		`"max_token_bytes":8192`, `"undecidable_response":"error_response"`, `"max_age":"1m0s"`} {
		if !strings.Contains(out, want) {
			t.Errorf("effective config lacks %s:\n%s", want, out)
		}
	}
	for _, zero := range []string{`"realm":""`, `"timeout":"0s"`, `"max_bytes":0`} {
		if strings.Contains(out, zero) {
			t.Errorf("effective config shows %s", zero)
		}
	}
}

// TestDemoCommand: `tokenauthz demo` alone shows the first allow and two
// denies, through the real server and client, in one terminal.
func TestDemoCommand(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := cli([]string{"demo", "--once", "--grpc-addr", "127.0.0.1:0", "--http-addr", "off"}, &out, &errOut); code != 0 {
		t.Fatalf("demo: exit %d: %s", code, errOut.String())
	}
	for _, want := range []string{"ALLOW: headers for the upstream:", "x-user-id=alice", "DENY 403", `scope="admin"`, "DENY 401", "grpcurl -plaintext"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}

// TestErrorKeysExist: every key a config problem names is a key of the
// config file (issue 26: messages named server.admin_token or
// cache.redis.hmac_key, which no config has).
func TestErrorKeysExist(t *testing.T) {
	dir := t.TempDir()
	short := filepath.Join(dir, "short")
	_ = os.WriteFile(short, []byte("short"), 0o600)
	bad := fmt.Sprintf(`server:
  grpc_addr: nowhere
  admin_token_file: %[1]s
  tls: { cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem, client_ca_file: /nonexistent/ca.pem }
  log_format: xml
  lameduck: -1s
cache:
  max_bytes: 10
  redis: { addrs: [no-port], password_file: /nonexistent/pw, sentinel_password_env: NO_SUCH_ENV_26, hmac_key_file: %[1]s, timeout: -1s }
issuers:
  - { name: main, issuer: https://i.example, algorithms: [RS999], leeway: 10m, hmac_secret_file: /nonexistent/h }
routes:
  - { name: r, match: { path: /a, path_prefix: /b, host: "bad host", methods: [get] }, sender_constraint: x, introspect: y,
      when: ["claims.x =="], headers: { Bad: sub }, issuers: [nobody] }
headers: { authorization: sub }
http_authz: { proxies: [haproxy], trusted_proxies: [nope] }
kubernetes: { host_delegation: [{ namespaces: [], hosts: [] }] }
`, short)
	_, err := parseConfig([]byte(bad), "bad.yaml")
	if err == nil {
		t.Fatal("a bad config parsed")
	}
	problems := err.(*configError).problems
	t.Logf("%d problems: %q", len(problems), problems)
	if len(problems) < 15 {
		t.Fatalf("only %d problems: %v", len(problems), problems)
	}
	for _, p := range problems {
		key, _, _ := strings.Cut(p, ": ")
		if strings.HasPrefix(key, "line ") {
			continue
		}
		if !schemaHas(reflect.TypeOf(fileConfig{}), key) {
			t.Errorf("%q names %q, which is no key of the config file", p, key)
		}
	}
}

// schemaHas walks a YAML key path (a.b[0].c, map keys allowed) through the
// yaml tags of t.
func schemaHas(t reflect.Type, path string) bool {
	path = regexp.MustCompile(`\[\d+\]`).ReplaceAllString(path, "")
	for part := range strings.SplitSeq(path, ".") {
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
			t = t.Elem()
		}
		if t.Kind() == reflect.Map {
			t = t.Elem() // any map key
			continue
		}
		if t.Kind() != reflect.Struct {
			return false
		}
		found := false
		for f := range structFields(t) {
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if name == part {
				t, found = f.Type, true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// structFields are t's fields, those of inline (embedded) structs included.
func structFields(t reflect.Type) func(func(reflect.StructField) bool) {
	return func(yield func(reflect.StructField) bool) {
		for i := range t.NumField() {
			f := t.Field(i)
			if strings.Contains(f.Tag.Get("yaml"), "inline") {
				for g := range structFields(f.Type) {
					if !yield(g) {
						return
					}
				}
				continue
			}
			if !yield(f) {
				return
			}
		}
	}
}

// TestDocumentedFlagsExist: every flag the README and docs/ show with a
// tokenauthz command is one of that command's flags (usage and --help come
// from the same definitions, so they cannot disagree either).
func TestDocumentedFlagsExist(t *testing.T) {
	files, _ := filepath.Glob("../../docs/*.md")
	files = append(files, "../../README.md")
	flagsOf := map[string]string{}
	for _, c := range commands {
		var help bytes.Buffer
		if code := cli([]string{c.name, "--help"}, io.Discard, &help); code != 0 {
			t.Fatalf("%s --help exits %d", c.name, code)
		}
		flagsOf[c.name] = help.String()
		if !strings.Contains(usage(), "tokenauthz "+c.name) {
			t.Errorf("usage lacks %s", c.name)
		}
	}
	use := regexp.MustCompile(`tokenauthz ([a-z-]+)((?: +(?:\[|\(|\|)?-{1,2}[a-z][a-z-]*[^|\]\n` + "`" + `]*)*)`)
	flag := regexp.MustCompile(`(?:^|[\s\[(|])(-{1,2})([a-z][a-z-]*)`)
	seen := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range use.FindAllStringSubmatch(string(b), -1) {
			help, ok := flagsOf[m[1]]
			if !ok {
				continue // "tokenauthz serves", prose
			}
			for _, fm := range flag.FindAllStringSubmatch(m[2], -1) {
				seen++
				if !strings.Contains(help, "  -"+fm[2]+" ") && !strings.Contains(help, "  -"+fm[2]+"\n") {
					t.Errorf("%s: tokenauthz %s --%s: no such flag", filepath.Base(f), m[1], fm[2])
				}
			}
		}
	}
	if seen < 20 {
		t.Errorf("only %d documented flags found: the pattern misses them", seen)
	}
}

// TestValidateWarnings: a valid config that is likely wrong passes validate
// with a warning naming the route or issuer, and fails with --strict.
func TestValidateWarnings(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	jwks := `{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"k"}]}`
	_ = os.WriteFile(path, []byte(`issuers:
  - { name: main, issuer: main-idp, audiences: [api], algorithms: [ES256], jwks: '`+jwks+`' }
routes:
  - { name: reports, match: { path: /reports }, when: ["claims.sub"] }
  - { name: all, match: { path_prefix: / } }
  - { name: admin, match: { path_prefix: /admin }, scopes: [admin] }
`), 0o600)
	var out, errb bytes.Buffer
	if code := cli([]string{"validate", "--config", path}, &out, &errb); code != 0 {
		t.Fatalf("warnings are not errors: exit %d\n%s", code, errb.String())
	}
	for _, want := range []string{`issuers[0].issuer: "main-idp" is not a URL`, "routes[2] (admin): never matches: routes[1] (all)",
		"routes[0].when[0] (reports): its type is known only at run time"} {
		if !strings.Contains(errb.String(), want) {
			t.Errorf("no warning %q in\n%s", want, errb.String())
		}
	}
	errb.Reset()
	if code := cli([]string{"validate", "--strict", "--config", path}, &out, &errb); code != 1 {
		t.Errorf("--strict: exit %d", code)
	}
	// The demo and deploy configs have none.
	for _, f := range []string{"../../deploy/demo/config.yaml", "../../deploy/kubernetes/base/config.yaml"} {
		errb.Reset()
		if code := cli([]string{"validate", "--strict", "--config", f}, &out, &errb); code != 0 {
			t.Errorf("%s: %s", f, errb.String())
		}
	}
}

// TestReadmeConfigBlocks: every config shown in the README decodes
// strictly (each key it names is a key of the config) and validates.
func TestReadmeConfigBlocks(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, m := range regexp.MustCompile("(?s)```yaml\n(.*?)```").FindAllStringSubmatch(string(readme), -1) {
		if !strings.Contains(m[1], "issuers:") {
			continue // a manifest or a fragment, not a tokenauthz config
		}
		n++
		if _, err := parseConfig([]byte(m[1]), "README block"); err != nil {
			for _, p := range err.(*configError).problems {
				if !strings.Contains(p, "no such file") && !strings.Contains(p, "discovery") {
					t.Errorf("README config block: %s\n%s", p, m[1])
				}
			}
		}
	}
	if n == 0 {
		t.Fatal("no config block in the README")
	}
}
