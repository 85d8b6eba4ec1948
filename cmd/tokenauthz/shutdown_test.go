package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/tokenauthz/tokenauthz/deploy"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// TestMain lets the test binary run as the tokenauthz command, so tests can
// start the real process and signal it.
func TestMain(m *testing.M) {
	if args := os.Getenv("TOKENAUTHZ_RUN_AS_MAIN"); args != "" {
		var argv []string
		_ = json.Unmarshal([]byte(args), &argv)
		os.Exit(cli(argv, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// startProcess runs `tokenauthz args...` as a child process and returns it
// with the addresses it logged.
func startProcess(t *testing.T, args ...string) (*exec.Cmd, string, string, *logLines) {
	t.Helper()
	argv, _ := json.Marshal(args)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "TOKENAUTHZ_RUN_AS_MAIN="+string(argv))
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	logs := &logLines{}
	addrs := make(chan [2]string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			logs.add(line)
			var m map[string]any
			if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "serving" {
				addrs <- [2]string{m["grpc_addr"].(string), m["http_addr"].(string)}
			}
		}
	}()
	select {
	case a := <-addrs:
		return cmd, a[0], a[1], logs
	case <-time.After(20 * time.Second):
		t.Fatalf("the process did not start serving; logs:\n%s", logs)
	}
	return nil, "", "", nil
}

type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) add(s string) { l.mu.Lock(); l.lines = append(l.lines, s); l.mu.Unlock() }
func (l *logLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

func TestSIGTERMDrainsAndExitsZero(t *testing.T) {
	key := idptest.NewKey(t, "k1", "ES256")
	idp := idptest.New(t, key)
	idp.RegisterClient(idptest.Client{ID: "authz", Secret: "secret", Method: "client_secret_basic"})
	idp.SetDelay(200 * time.Millisecond) // every check of a new opaque token is in flight for 200ms
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	_ = os.WriteFile(secret, []byte("secret"), 0o600)
	cfgPath := filepath.Join(dir, "config.yaml")
	_ = os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
server: { grpc_addr: "127.0.0.1:0", http_addr: "127.0.0.1:0", lameduck: 500ms, shutdown_timeout: 5s }
issuers:
  - name: main
    issuer: "%s"
    audiences: [api]
    jwks_uri: "%s"
    algorithms: [ES256]
    introspection: { endpoint: "%s", client_id: authz, client_secret_file: "%s" }
routes:
  - { name: all, match: { path_prefix: / } }
`, idp.URL(), idp.JWKSURL(), idp.IntrospectionURL(), secret)), 0o600)
	cmd, grpcAddr, _, logs := startProcess(t, "serve", "--config", cfgPath)

	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	waitFor(t, func() bool {
		r, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{Service: "readiness"})
		return err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING
	})
	watch, err := hc.Watch(context.Background(), &healthpb.HealthCheckRequest{Service: "readiness"})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch: %v %v", r, err)
	}

	// Like Envoy: send checks until readiness turns NOT_SERVING, then stop
	// sending new ones. Every check sent must be answered.
	c := authv3.NewAuthorizationClient(conn)
	var notServing atomic.Bool
	var sent, answered atomic.Int64
	var wg sync.WaitGroup
	failed := make(chan string, 100)
	for range 8 {
		wg.Go(func() {
			for !notServing.Load() {
				sent.Add(1)
				resp, err := c.Check(context.Background(), &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
					Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/x", Host: "api",
						Headers: map[string]string{"authorization": "Bearer " + idp.Opaque(map[string]any{"sub": "u", "aud": "api",
							"exp": time.Now().Unix() + 60})}}}}})
				if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.OK {
					failed <- fmt.Sprint(err, resp.GetStatus())
					continue
				}
				answered.Add(1)
			}
		})
	}
	time.Sleep(300 * time.Millisecond) // checks in flight
	start := time.Now()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	r, err := watch.Recv()
	if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("after SIGTERM the watcher got %v %v, want NOT_SERVING first", r, err)
	}
	notServing.Store(true)
	wg.Wait()
	close(failed)
	for f := range failed {
		t.Errorf("a check sent before readiness turned was not answered: %s", f)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit: %v; logs:\n%s", err, logs)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("no exit within the 500ms lameduck + 5s deadline; logs:\n%s", logs)
	}
	t.Logf("%d checks sent, %d answered; exit %v after SIGTERM", sent.Load(), answered.Load(), time.Since(start).Round(time.Millisecond))
	if answered.Load() == 0 || answered.Load() != sent.Load() {
		t.Fatalf("%d sent, %d answered", sent.Load(), answered.Load())
	}
	if !strings.Contains(logs.String(), `"msg":"stopped"`) {
		t.Errorf("no orderly stop in the logs:\n%s", logs)
	}
}

// TestServeDemoPrintsFirstAllow: `serve` on the demo config (here on free
// ports) prints a demo token and a grpcurl line whose request is allowed.
func TestServeDemoPrintsFirstAllow(t *testing.T) {
	argv, _ := json.Marshal([]string{"serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "TOKENAUTHZ_RUN_AS_MAIN="+string(argv))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 64<<10)
		for sc.Scan() {
			if l := strings.TrimSpace(sc.Text()); strings.HasPrefix(l, "grpcurl ") {
				line <- l
				return
			}
		}
	}()
	var grpcurl string
	select {
	case grpcurl = <-line:
	case <-time.After(20 * time.Second):
		t.Fatal("serve on the demo config printed no grpcurl line")
	}
	// grpcurl -plaintext -d '<json>' <addr> <method>
	body := grpcurl[strings.Index(grpcurl, "'")+1 : strings.LastIndex(grpcurl, "'")]
	fields := strings.Fields(grpcurl[strings.LastIndex(grpcurl, "'")+1:])
	var req authv3.CheckRequest
	if err := protojson.Unmarshal([]byte(body), &req); err != nil {
		t.Fatalf("the printed request does not parse: %v\n%s", err, grpcurl)
	}
	conn, err := grpc.NewClient(fields[0], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var resp *authv3.CheckResponse
	waitFor(t, func() bool {
		resp, err = authv3.NewAuthorizationClient(conn).Check(context.Background(), &req)
		return err == nil
	})
	if resp.GetStatus().GetCode() != 0 {
		t.Fatalf("the printed request was denied: %v", resp)
	}
}

// TestAdminOnItsOwnListener: with server.admin_addr the admin API is served
// there and no longer on the health and metrics port.
func TestAdminOnItsOwnListener(t *testing.T) {
	dir := t.TempDir()
	tokFile := filepath.Join(dir, "admin")
	_ = os.WriteFile(tokFile, []byte(adminToken), 0o600)
	cfgPath := filepath.Join(dir, "config.yaml")
	cfg := strings.Replace(string(deploy.DemoConfig), "  http_addr: 127.0.0.1:9090\n",
		fmt.Sprintf("  http_addr: 127.0.0.1:0\n  admin_addr: 127.0.0.1:0\n  admin_token_file: %q\n", tokFile), 1)
	cfg = strings.Replace(cfg, "grpc_addr: 127.0.0.1:9191", "grpc_addr: 127.0.0.1:0", 1)
	_ = os.WriteFile(cfgPath, []byte(cfg), 0o600)
	_, _, httpAddr, logs := startProcess(t, "serve", "--config", cfgPath)
	var adminAddr string
	for _, l := range strings.Split(logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "serving" {
			adminAddr, _ = m["admin_addr"].(string)
		}
	}
	if adminAddr == "" || adminAddr == httpAddr {
		t.Fatalf("admin_addr %q (http %q)", adminAddr, httpAddr)
	}
	post := func(addr string) int {
		return postRevoke(t, "http://"+addr, adminToken, `{"token_sha256":"`+strings.Repeat("a", 64)+`"}`)
	}
	if got := post(adminAddr); got != http.StatusOK {
		t.Errorf("admin listener: %d", got)
	}
	if got := post(httpAddr); got != http.StatusNotFound {
		t.Errorf("the health and metrics port still serves the admin API: %d", got)
	}
}
