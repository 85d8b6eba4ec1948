// Command loadbench measures tokenauthz against the floor for an ext_authz
// server: an allow-all Check server that reads nothing (./allowall), both
// driven on loopback by ghz with the same payloads, and prints one table
// with the ratios the README quotes.
//
//	go run ./cmd/loadbench            # about 20 minutes on 2 cores (-runs 1 -memory 0: 5)
//
// It builds the servers, installs ghz if it is not on PATH (go install
// github.com/bojand/ghz/cmd/ghz@v0.120.0), mints RS256 tokens, and runs the
// workloads: one token (warm caches); the same on a route with three CEL
// conditions and two CEL headers; 10,000 distinct tokens in rotation
// (warmed by two passes: the verified-token cache keeps a token from its
// second verification); every token new; one DPoP-bound token with a fresh ES256
// proof on every request; one token over the HTTP endpoint; one token with
// decision logs on; 10,000 tokens of 10,000 tenants of an issuer template
// (served by a multi-tenant provider in this process, each tenant
// discovered once while warming); and one token with an OTLP exporter
// configured (to a sink here that discards), Envoy's trace context sampled
// and not sampled; and the one token against OPA-Envoy, rebuilt on OPA's Go
// SDK (./opaenvoy, its own module: the plugin is not on the module proxy).
// Last, memory: 2,000,000 never-seen HS256 tokens (-memory), each checked
// twice, with the server's RSS read along the way (memory.go).
//
// Each workload runs -runs times per server, alternating allow-all and
// tokenauthz, so the machine's drift falls on both; the table shows the
// medians and each workload's CPU ratio to allow-all. Server CPU time and
// RSS come from /proc; the bare crypto/rsa verify of the same key is
// measured in this process, in the same run, and so is a bare P-256 verify
// for the proofs. ghz shares the cores with the server, as a sidecar Envoy
// would.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
)

var (
	requests    = flag.Int("n", 20000, "checks per measured run")
	concurrency = flag.Int("c", 50, "concurrent ghz workers")
	distinct    = flag.Int("distinct", 10000, "tokens in rotation for the distinct-token workload")
	keep        = flag.Bool("keep", false, "keep the work directory")
	only        = flag.String("only", "", "run only the workloads whose name holds this")
	runs        = flag.Int("runs", 3, "runs of each server per workload, interleaved (allow-all, tokenauthz, allow-all, ...); medians are reported")
	tenants     = flag.Int("tenants", 10000, "tenants of the issuer template for the tenants workload")
	memTokens   = flag.Int("memory", 2_000_000, "distinct tokens for the memory workload (RSS read after 100,000 and at the end); 0 skips it")
	markdown    = flag.String("markdown", "", "also write the report, with the machine it ran on, into this file between its loadbench markers (docs/performance.md)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "loadbench:", err)
		os.Exit(1)
	}
}

type result struct {
	workload, server string
	rps              float64
	p50, p99         time.Duration
	cpuPerCheck      time.Duration
	rssMiB           float64
	allows           float64 // tokenauthz only: allows counted by its metrics
}

func run() error {
	dir, err := os.MkdirTemp("", "loadbench")
	if err != nil {
		return err
	}
	if !*keep {
		defer os.RemoveAll(dir)
	}
	step("building tokenauthz and allowall")
	for _, b := range [][2]string{{"tokenauthz", "./cmd/tokenauthz"}, {"allowall", "./cmd/loadbench/allowall"}} {
		if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, b[0]), b[1]).CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %v\n%s", b[1], err, out)
		}
	}
	// OPA-Envoy's stand-in is a module of its own (OPA is big): built in
	// its directory.
	build := exec.Command("go", "build", "-o", filepath.Join(dir, "opaenvoy"), ".")
	build.Dir = filepath.Join("cmd", "loadbench", "opaenvoy")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go build opaenvoy: %v\n%s", err, out)
	}
	ghz, err := findGhz(dir)
	if err != nil {
		return err
	}

	step("minting tokens")
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	idp, err := startTenantIdP(key)
	if err != nil {
		return err
	}
	defer idp.Close()
	cfgPath, err := writeConfig(dir, key, idp.URL)
	if err != nil {
		return err
	}
	one := mint(key, 1)
	rotation := mint(key, *distinct)
	fresh := mint(key, *requests)
	files := map[string]string{}
	for name, toks := range map[string][]string{"same": one, "distinct": rotation, "new": fresh} {
		if files[name], err = writeData(dir, name, "/api/orders/1", toks); err != nil {
			return err
		}
	}
	if files["cel"], err = writeData(dir, "cel", "/cel/orders/1", one); err != nil {
		return err
	}
	if files["tenants"], err = writeData(dir, "tenants", "/api/orders/1", mintTenants(key, idp.URL, *tenants, *distinct)); err != nil {
		return err
	}
	bare := bareVerify(key)
	dpopKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	bound, jwkJSON, err := mintBound(key, dpopKey)
	if err != nil {
		return err
	}
	bareES := bareVerifyES256(dpopKey)

	// The same config with decision logs on at their default sampling,
	// written to stdout as in production (the script discards the pipe).
	base, err := os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	logCfg := filepath.Join(dir, "config-decision-log.yaml")
	if err := os.WriteFile(logCfg, append(base, []byte("decision_log: { allows: 0.01, denies: 1.0 }\n")...), 0o600); err != nil {
		return err
	}
	sink, err := startOTLPSink()
	if err != nil {
		return err
	}
	defer sink.Close()
	// Tracing as production runs it: an OTLP exporter (to a sink that
	// discards) with the default parent-based sampler, Envoy's trace
	// context in the call's metadata, sampled or not.
	otlp := []string{"OTEL_TRACES_EXPORTER=otlp", "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT=" + sink.URL}
	const sampled, unsampled = `{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}`,
		`{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}`
	workloads := []struct {
		name, data string
		warm       int    // checks sent before measuring (same payloads)
		cfg        string // tokenauthz's config, if not the common one
		env        []string
		metadata   string   // gRPC metadata of every call (JSON), for ghz
		servers    []string // the pair compared, if not allow-all and tokenauthz
	}{
		{"one token, warm", files["same"], 2000, "", nil, "", nil},
		{"warm, 3 CEL whens + 2 CEL headers", files["cel"], 2000, "", nil, "", nil},
		{fmt.Sprintf("%d distinct tokens", *distinct), files["distinct"], 2 * *distinct, "", nil, "", nil},
		{"every token new", files["new"], 0, "", nil, "", nil},
		{"DPoP, new proofs", "", 0, "", nil, "", nil},
		{"one token, warm, HTTP", "http:" + one[0], 2000, "", nil, "", nil},
		{"one token, warm, decision log", files["same"], 2000, logCfg, nil, "", nil},
		{fmt.Sprintf("%d tenants, %d tokens", *tenants, *distinct), files["tenants"], 2 * *distinct, "", nil, "", nil},
		{"one token, warm, OTLP, sampled", files["same"], 2000, "", otlp, sampled, nil},
		{"one token, warm, OTLP, not sampled", files["same"], 2000, "", otlp, unsampled, nil},
		// The comparison of issue 22: OPA-Envoy's CPU over tokenauthz's.
		{"one token, warm: OPA-Envoy", files["same"], 2000, "", nil, "", []string{"tokenauthz", "opaenvoy"}},
	}
	var results []result
	for _, w := range workloads {
		if *only != "" && !strings.Contains(w.name, *only) {
			continue
		}
		var sign func() (string, error)
		if w.data == "" {
			// Proofs are valid for max_age, and a pod without Redis refuses
			// proofs made before it started (it cannot know their jti were
			// not used): they are signed once the server is up, before the
			// measured run.
			sign = func() (string, error) {
				step("signing DPoP proofs")
				return writeDPoPData(dir, bound, jwkJSON, dpopKey, *requests)
			}
		}
		// Runs alternate between the servers, so drift of the machine
		// (other load, frequency, thermal) falls on both alike.
		pair := []string{"allowall", "tokenauthz"}
		if w.servers != nil {
			pair = w.servers
		}
		per := map[string][]result{}
		for run := range *runs {
			for _, srv := range pair {
				step(fmt.Sprintf("%s: %s (run %d of %d)", w.name, srv, run+1, *runs))
				c := cfgPath
				if w.cfg != "" {
					c = w.cfg
				}
				r, err := measure(dir, ghz, srv, c, w.data, w.warm, w.env, w.metadata, sign)
				if err != nil {
					return fmt.Errorf("%s on %s: %w", w.name, srv, err)
				}
				r.workload = w.name
				per[srv] = append(per[srv], r)
			}
		}
		results = append(results, median(per[pair[0]]), median(per[pair[1]]))
	}
	var mem *memoryResult
	if name := "memory in distinct tokens"; *memTokens > 0 && (*only == "" || strings.Contains(name, *only)) {
		step(fmt.Sprintf("%s: tokenauthz, %d tokens", name, *memTokens))
		points := []int{}
		for _, p := range []int{100_000, 500_000, 1_000_000} {
			if p < *memTokens {
				points = append(points, p)
			}
		}
		if mem, err = memoryRun(dir, append(points, *memTokens)); err != nil {
			return err
		}
	}
	var out bytes.Buffer
	w := io.MultiWriter(os.Stdout, &out)
	if len(results) > 0 {
		report(w, results, bare, bareES)
	}
	if mem != nil {
		mem.report(w)
	}
	if *markdown != "" {
		return writeMarkdown(*markdown, out.String())
	}
	return nil
}

// mintBound signs one RS256 token bound to the DPoP key (cnf.jkt) and
// returns it with the key's public JWK.
func mintBound(key *rsa.PrivateKey, dk *ecdsa.PrivateKey) (string, string, error) {
	pub, err := jwk.FromRaw(dk.Public())
	if err != nil {
		return "", "", err
	}
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		return "", "", err
	}
	jwkJSON, err := json.Marshal(pub)
	if err != nil {
		return "", "", err
	}
	now := time.Now().Unix()
	hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"RS256","kid":"bench","typ":"JWT"}`))
	claims := fmt.Sprintf(`{"iss":"https://bench.example","aud":"api","sub":"dpop-user","scope":"read write","iat":%d,"exp":%d,"cnf":{"jkt":%q}}`,
		now, now+7200, base64.RawURLEncoding.EncodeToString(tp))
	input := hdr + "." + base64.RawURLEncoding.EncodeToString([]byte(claims))
	sum := sha256.Sum256([]byte(input))
	sig, err := rsa.SignPKCS1v15(nil, key, crypto.SHA256, sum[:])
	if err != nil {
		return "", "", err
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sig), string(jwkJSON), nil
}

// writeDPoPData writes n CheckRequests with the bound token and a fresh
// ES256 proof each (DPoP scheme), signed on every core.
func writeDPoPData(dir, tok, jwkJSON string, dk *ecdsa.PrivateKey, n int) (string, error) {
	hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"typ":"dpop+jwt","alg":"ES256","jwk":` + jwkJSON + `}`))
	ath := sha256.Sum256([]byte(tok))
	now := time.Now().Unix()
	proofs := make([]string, n)
	var wg sync.WaitGroup
	workers := runtime.NumCPU()
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				claims := fmt.Sprintf(`{"jti":"p-%d","htm":"GET","htu":"https://api.example.com/api/orders/1","iat":%d,"ath":%q}`,
					i, now, base64.RawURLEncoding.EncodeToString(ath[:]))
				input := hdr + "." + base64.RawURLEncoding.EncodeToString([]byte(claims))
				sum := sha256.Sum256([]byte(input))
				r, s, err := ecdsa.Sign(rand.Reader, dk, sum[:])
				if err != nil {
					panic(err)
				}
				sig := make([]byte, 64)
				r.FillBytes(sig[:32])
				s.FillBytes(sig[32:])
				proofs[i] = input + "." + base64.RawURLEncoding.EncodeToString(sig)
			}
		})
	}
	wg.Wait()
	p := filepath.Join(dir, "dpop.json")
	f, err := os.Create(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	bw := bufio.NewWriter(f)
	bw.WriteString("[")
	for i, pr := range proofs {
		if i > 0 {
			bw.WriteString(",")
		}
		fmt.Fprintf(bw, `{"attributes":{"request":{"http":{"id":"%d","method":"GET","path":"/api/orders/1","host":"api.example.com","scheme":"https","protocol":"HTTP/2","headers":{":method":"GET",":path":"/api/orders/1",":authority":"api.example.com","authorization":"DPoP %s","dpop":"%s","user-agent":"curl/8.5.0","x-request-id":"%d"}}}}}`,
			i, tok, pr, i)
	}
	bw.WriteString("]")
	if err := bw.Flush(); err != nil {
		return "", err
	}
	return p, f.Close()
}

// bareVerifyES256 is the floor for a proof: one P-256 ECDSA verify with the
// SHA-256 of a proof-sized input.
func bareVerifyES256(k *ecdsa.PrivateKey) time.Duration {
	input := []byte(strings.Repeat("a", 400))
	sum := sha256.Sum256(input)
	r, s, _ := ecdsa.Sign(rand.Reader, k, sum[:])
	n := 0
	start := time.Now()
	for time.Since(start) < 2*time.Second {
		h := sha256.Sum256(input)
		if !ecdsa.Verify(&k.PublicKey, h[:], r, s) {
			panic("verify")
		}
		n++
	}
	return time.Since(start) / time.Duration(n)
}

func step(s string) { fmt.Fprintf(os.Stderr, "== %s\n", s) }

func findGhz(dir string) (string, error) {
	if p, err := exec.LookPath("ghz"); err == nil {
		return p, nil
	}
	gopath := strings.TrimSpace(run1("go", "env", "GOPATH"))
	if p := filepath.Join(gopath, "bin", "ghz"); fileExists(p) {
		return p, nil
	}
	step("installing ghz v0.120.0 (go install)")
	cmd := exec.Command("go", "install", "github.com/bojand/ghz/cmd/ghz@v0.120.0")
	cmd.Env = append(os.Environ(), "GOBIN="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install ghz: %v\n%s", err, out)
	}
	return filepath.Join(dir, "ghz"), nil
}

func run1(name string, args ...string) string {
	out, _ := exec.Command(name, args...).Output()
	return string(out)
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func writeConfig(dir string, key *rsa.PrivateKey, idpURL string) (string, error) {
	pub, err := jwk.FromRaw(key.Public())
	if err != nil {
		return "", err
	}
	_ = pub.Set(jwk.KeyIDKey, "bench")
	_ = pub.Set(jwk.AlgorithmKey, "RS256")
	set := jwk.NewSet()
	_ = set.AddKey(pub)
	doc, err := json.Marshal(set)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "jwks.json"), doc, 0o600); err != nil { // for opaenvoy
		return "", err
	}
	cfg := fmt.Sprintf(`server: { grpc_addr: "127.0.0.1:0", http_addr: "127.0.0.1:0", http_authz_addr: "127.0.0.1:0", reflection: true }
issuers:
  - name: bench
    issuer: "https://bench.example"
    audiences: [api]
    algorithms: [RS256]
    jwks: '%s'

    dpop: {}
  - name: tenants
    issuer_template: "%s/realms/{tenant}"
    tenants: { any: true }
    discovery: true
    audiences: [api]
    algorithms: [RS256]
    max_discoveries_per_second: 100000
routes:
  - name: cel
    match: { path_prefix: /cel }
    scopes: [read]
    when:
      - "request.method in ['GET', 'HEAD'] || 'write' in scopes"
      - "request.path.startsWith('/cel/orders/')"
      - "claims.sub != '' && issuer == 'bench'"
    headers:
      x-sub-route: { cel: "claims.sub + '@' + route" }
      x-scope-count: { cel: "size(scopes)" }
  - { name: api, match: { path_prefix: /api }, scopes: [read] }
headers: { x-user-id: sub, x-user-scopes: scope }
reserved_header_prefix: x-auth-
`, doc, idpURL)
	p := filepath.Join(dir, "config.yaml")
	return p, os.WriteFile(p, []byte(cfg), 0o600)
}

// mint signs n distinct RS256 tokens, on every core.
func mint(key *rsa.PrivateKey, n int) []string {
	return signAll(key, n, func(i int, now int64) string {
		return fmt.Sprintf(`{"iss":"https://bench.example","aud":"api","sub":"user-%d","scope":"read write","iat":%d,"exp":%d,"jti":"%d"}`,
			i, now, now+7200, i)
	})
}

// signAll signs n RS256 tokens with the claims claims(i, now) gives, on
// every core.
func signAll(key *rsa.PrivateKey, n int, claims func(i int, now int64) string) []string {
	toks := make([]string, n)
	hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"RS256","kid":"bench","typ":"JWT"}`))
	now := time.Now().Unix()
	var wg sync.WaitGroup
	workers := runtime.NumCPU()
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				input := hdr + "." + base64.RawURLEncoding.EncodeToString([]byte(claims(i, now)))
				sum := sha256.Sum256([]byte(input))
				sig, err := rsa.SignPKCS1v15(nil, key, crypto.SHA256, sum[:])
				if err != nil {
					panic(err)
				}
				toks[i] = input + "." + base64.RawURLEncoding.EncodeToString(sig)
			}
		})
	}
	wg.Wait()
	return toks
}

// writeData writes ghz call data: one CheckRequest per token, as Envoy
// would send it; ghz sends them round-robin.
func writeData(dir, name, path string, toks []string) (string, error) {
	p := filepath.Join(dir, name+".json")
	f, err := os.Create(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	w := bufio.NewWriter(f)
	w.WriteString("[")
	for i, t := range toks {
		if i > 0 {
			w.WriteString(",")
		}
		fmt.Fprintf(w, `{"attributes":{"request":{"http":{"id":"%d","method":"GET","path":%q,"host":"api.example.com","scheme":"https","protocol":"HTTP/2","headers":{":method":"GET",":path":%q,":authority":"api.example.com","authorization":"Bearer %s","user-agent":"curl/8.5.0","x-request-id":"%d","x-user-id":"spoofed"}}}}}`,
			i, path, path, t, i)
	}
	w.WriteString("]")
	if err := w.Flush(); err != nil {
		return "", err
	}
	return p, f.Close()
}

// bareVerify is the floor for a new token: one RSA PKCS#1 v1.5 verify of
// the same key, with the SHA-256 of a token-sized input, measured here.
func bareVerify(key *rsa.PrivateKey) time.Duration {
	input := []byte(strings.Repeat("a", 300))
	sum := sha256.Sum256(input)
	sig, _ := rsa.SignPKCS1v15(nil, key, crypto.SHA256, sum[:])
	n := 0
	start := time.Now()
	for time.Since(start) < 2*time.Second {
		h := sha256.Sum256(input)
		if rsa.VerifyPKCS1v15(&key.PublicKey, crypto.SHA256, h[:], sig) != nil {
			panic("verify")
		}
		n++
	}
	return time.Since(start) / time.Duration(n)
}

type server struct {
	cmd            *exec.Cmd
	grpc, httpAddr string
	authz          string // the HTTP authorization endpoint
}

func start(dir, name, cfgPath string, env []string) (*server, error) {
	s := &server{}
	if name == "opaenvoy" || name == "allowall" {
		// Both print their addresses on stdout: gRPC, then (allow-all) HTTP.
		s.cmd = exec.Command(filepath.Join(dir, "allowall"))
		lines := 2
		if name == "opaenvoy" {
			s.cmd, lines = exec.Command(filepath.Join(dir, "opaenvoy"), "-jwks", filepath.Join(dir, "jwks.json")), 1
		}
		s.cmd.Stderr = os.Stderr
		out, err := s.cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		if err := s.cmd.Start(); err != nil {
			return nil, err
		}
		rd := bufio.NewReader(out)
		var addrs []string
		for range lines {
			line, err := rd.ReadString('\n')
			if err != nil {
				s.stop()
				return nil, fmt.Errorf("%s did not start: %v", name, err)
			}
			addrs = append(addrs, strings.TrimSpace(line))
		}
		s.grpc = addrs[0]
		if lines > 1 {
			s.authz = addrs[1]
		}
		return s, nil
	}
	s.cmd = exec.Command(filepath.Join(dir, "tokenauthz"), "serve", "--config", cfgPath)
	s.cmd.Env = append(os.Environ(), "OTEL_TRACES_EXPORTER=none")
	if env != nil {
		s.cmd.Env = append(os.Environ(), env...)
	}
	errPipe, err := s.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	// The "serving" log line names the addresses; later lines are drained
	// so the pipe never blocks the server.
	addrs := make(chan [3]string, 1)
	go func() {
		sc := bufio.NewScanner(errPipe)
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == "serving" {
				g, _ := m["grpc_addr"].(string)
				h, _ := m["http_addr"].(string)
				z, _ := m["http_authz_addr"].(string)
				addrs <- [3]string{g, h, z}
			}
		}
	}()
	select {
	case a := <-addrs:
		s.grpc, s.httpAddr, s.authz = a[0], a[1], a[2]
		return s, nil
	case <-time.After(30 * time.Second):
		s.stop()
		return nil, errors.New("tokenauthz did not start serving")
	}
}

func (s *server) stop() {
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
}

// cpu is the process's user+system CPU time, from /proc/<pid>/stat.
func cpu(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name (which may hold spaces, in parens).
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const ticks = 100 // sysconf(_SC_CLK_TCK) on Linux
	return time.Duration(utime+stime) * time.Second / ticks, nil
}

// rss is the resident set size in MiB, from /proc/<pid>/status.
func rss(pid int) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024
		}
	}
	return 0
}

type ghzReport struct {
	Count   int     `json:"count"`
	RPS     float64 `json:"rps"`
	Latency []struct {
		Percentage int   `json:"percentage"`
		Latency    int64 `json:"latency"`
	} `json:"latencyDistribution"`
	Status map[string]int `json:"statusCodeDistribution"`
}

func ghzRun(ghz, addr, data, md string, n int) (*ghzReport, error) {
	args := []string{"--insecure", "--call", "envoy.service.auth.v3.Authorization/Check",
		"-n", strconv.Itoa(n), "-c", strconv.Itoa(*concurrency), "--connections", "2",
		"-D", data, "--format", "json"}
	if md != "" {
		args = append(args, "--metadata", md)
	}
	out, err := exec.Command(ghz, append(args, addr)...).Output()
	if err != nil {
		return nil, fmt.Errorf("ghz: %v", err)
	}
	var r ghzReport
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, fmt.Errorf("ghz output: %v", err)
	}
	if r.Status["OK"] != n {
		return nil, fmt.Errorf("ghz: %d of %d calls OK: %v", r.Status["OK"], n, r.Status)
	}
	return &r, nil
}

func measure(dir, ghz, name, cfgPath, data string, warm int, env []string, md string, sign func() (string, error)) (result, error) {
	s, err := start(dir, name, cfgPath, env)
	if err != nil {
		return result{}, err
	}
	defer s.stop()
	if sign != nil {
		if data, err = sign(); err != nil {
			return result{}, err
		}
	}
	load := func(n int) (*ghzReport, error) { return ghzRun(ghz, s.grpc, data, md, n) }
	if tok, isHTTP := strings.CutPrefix(data, "http:"); isHTTP {
		load = func(n int) (*ghzReport, error) { return httpRun(s.authz, tok, n) }
	}
	if name == "opaenvoy" {
		// ghz counts a denying CheckResponse as a gRPC OK: see that it allows.
		if err := allowsFirst(s.grpc, data); err != nil {
			return result{}, err
		}
	}
	if warm > 0 {
		if _, err := load(warm); err != nil {
			return result{}, err
		}
	}
	allowsBefore := s.allows()
	before, err := cpu(s.cmd.Process.Pid)
	if err != nil {
		return result{}, err
	}
	rep, err := load(*requests)
	if err != nil {
		return result{}, err
	}
	after, _ := cpu(s.cmd.Process.Pid)
	r := result{server: name, rps: rep.RPS, cpuPerCheck: (after - before) / time.Duration(*requests), rssMiB: rss(s.cmd.Process.Pid)}
	for _, l := range rep.Latency {
		switch l.Percentage {
		case 50:
			r.p50 = time.Duration(l.Latency)
		case 99:
			r.p99 = time.Duration(l.Latency)
		}
	}
	if name == "tokenauthz" {
		// ghz sees every answer as a gRPC OK, allow or deny: count allows.
		r.allows = s.allows() - allowsBefore
		if int(r.allows) != *requests {
			return r, fmt.Errorf("%v of %d checks were allows", r.allows, *requests)
		}
	}
	return r, nil
}

// allowsFirst sends the first request of a ghz data file and fails unless
// it is allowed.
func allowsFirst(addr, data string) error {
	b, err := os.ReadFile(data)
	if err != nil {
		return err
	}
	var reqs []json.RawMessage
	if err := json.Unmarshal(b, &reqs); err != nil || len(reqs) == 0 {
		return fmt.Errorf("%s: no requests (%v)", data, err)
	}
	var req authv3.CheckRequest
	if err := protojson.Unmarshal(reqs[0], &req); err != nil {
		return err
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := authv3.NewAuthorizationClient(cc).Check(ctx, &req)
	if err != nil {
		return err
	}
	if c := resp.GetStatus().GetCode(); c != 0 {
		return fmt.Errorf("%s denied the first request (code %d)", addr, c)
	}
	return nil
}

// allows reads tokenauthz_decisions_total{decision="allow"} from /metrics.
func (s *server) allows() float64 {
	return s.series(func(l string) bool {
		return strings.HasPrefix(l, "tokenauthz_decisions_total{") && strings.Contains(l, `decision="allow"`)
	})
}

// series sums the /metrics series whose lines match.
func (s *server) series(match func(line string) bool) float64 {
	if s.httpAddr == "" {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.httpAddr+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, l := range strings.Split(string(b), "\n") {
		if match(l) {
			f := strings.Fields(l)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum += v
		}
	}
	return sum
}

func report(w io.Writer, rs []result, bare, bareES time.Duration) {
	fmt.Fprintf(w, "\nmedians of %d interleaved runs per server; ratio: tokenauthz's CPU per check over allow-all's (OPA-Envoy: its CPU over tokenauthz's)\n", *runs)
	fmt.Fprintf(w, "\n%-34s %-11s %10s %9s %9s %12s %8s %8s\n", "workload", "server", "checks/s", "p50", "p99", "CPU/check", "ratio", "RSS MiB")
	for i, r := range rs {
		ratio := ""
		if i%2 == 1 && rs[i-1].cpuPerCheck > 0 {
			ratio = fmt.Sprintf("%.2fx", float64(r.cpuPerCheck)/float64(rs[i-1].cpuPerCheck))
		}
		fmt.Fprintf(w, "%-34s %-11s %10.0f %9s %9s %12s %8s %8.1f\n", r.workload, r.server, r.rps,
			r.p50.Round(time.Microsecond), r.p99.Round(time.Microsecond), r.cpuPerCheck.Round(100*time.Nanosecond), ratio, r.rssMiB)
	}
	fmt.Fprintf(w, "\nbare crypto/rsa PKCS#1 v1.5 verify (2048-bit, same key): %s\n", bare.Round(100*time.Nanosecond))
	fmt.Fprintf(w, "bare crypto/ecdsa P-256 verify (the proof's key): %s\n\n", bareES.Round(100*time.Nanosecond))
	type target struct {
		what   string
		got    float64
		limit  float64
		higher bool // the figure must be at least the limit
	}
	var ts []target
	for i := 0; i+1 < len(rs) && *only == ""; i += 2 {
		a, t := rs[i], rs[i+1]
		switch i / 2 {
		case 1:
			ts = append(ts, target{"warm, CEL route: throughput vs allow-all", t.rps / a.rps, 0.9, true},
				target{"warm, CEL route: CPU per check vs allow-all", float64(t.cpuPerCheck) / float64(a.cpuPerCheck), 1.1, false})
		case 0:
			ts = append(ts,
				target{"warm token: throughput vs allow-all", t.rps / a.rps, 0.95, true},
				target{"warm token: p99 vs allow-all", float64(t.p99) / float64(a.p99), 1.1, false},
				target{"warm token: CPU per check vs allow-all", float64(t.cpuPerCheck) / float64(a.cpuPerCheck), 1.1, false})
		case 2:
			ts = append(ts, target{"distinct tokens: throughput vs allow-all", t.rps / a.rps, 0.9, true})
		case 3:
			limit := float64(a.cpuPerCheck+bare*11/10) / float64(a.cpuPerCheck)
			ts = append(ts, target{"new tokens: CPU per check vs allow-all (limit: + 1.1 bare verifies)",
				float64(t.cpuPerCheck) / float64(a.cpuPerCheck), limit, false})
		case 4:
			warm := rs[1].cpuPerCheck
			limit := float64(warm+bareES*13/10) / float64(warm)
			ts = append(ts, target{"DPoP: CPU per check vs warm tokenauthz (limit: + 1.3 bare ES256 verifies)",
				float64(t.cpuPerCheck) / float64(warm), limit, false})
		}
	}
	var grpcWarm, grpcFloor, httpWarm, httpFloor, logWarm, logFloor time.Duration
	var distinctT, distinctFloor, tenantsT, tenantsFloor time.Duration
	var otlpRuns [][3]any
	var opa []target
	tenantsRSS := 0.0
	for i, r := range rs {
		switch {
		case strings.HasSuffix(r.workload, "distinct tokens") && r.server == "tokenauthz":
			distinctT, distinctFloor = r.cpuPerCheck, rs[i-1].cpuPerCheck
		case strings.Contains(r.workload, " tenants, ") && r.server == "tokenauthz":
			tenantsT, tenantsFloor, tenantsRSS = r.cpuPerCheck, rs[i-1].cpuPerCheck, r.rssMiB
		case r.workload == "one token, warm" && r.server == "tokenauthz":
			grpcWarm, grpcFloor = r.cpuPerCheck, rs[i-1].cpuPerCheck
		case r.workload == "one token, warm, HTTP" && r.server == "tokenauthz":
			httpWarm, httpFloor = r.cpuPerCheck, rs[i-1].cpuPerCheck
		case r.workload == "one token, warm, decision log" && r.server == "tokenauthz":
			logWarm, logFloor = r.cpuPerCheck, rs[i-1].cpuPerCheck
		case r.server == "opaenvoy" && rs[i-1].cpuPerCheck > 0:
			opa = append(opa, target{"OPA-Envoy: CPU per check over tokenauthz's (warm, RS256)",
				float64(r.cpuPerCheck) / float64(rs[i-1].cpuPerCheck), 7, true})
		case strings.HasPrefix(r.workload, "one token, warm, OTLP") && r.server == "tokenauthz":
			otlpRuns = append(otlpRuns, [3]any{r.workload, r.cpuPerCheck, rs[i-1].cpuPerCheck})
		}
	}
	if grpcWarm > 0 && httpWarm > 0 {
		ts = append(ts, target{"HTTP endpoint, warm: CPU per check vs warm gRPC check", float64(httpWarm) / float64(grpcWarm), 1.2, false})
		fmt.Fprintf(w, "HTTP floor (allow-all over HTTP/1.1 keep-alive): %s a check; tokenauthz over HTTP adds %s\n\n",
			httpFloor.Round(100*time.Nanosecond), (httpWarm - httpFloor).Round(100*time.Nanosecond))
	}
	if grpcWarm > 0 && logWarm > 0 {
		// Each against its own allow-all run, so the machine's drift
		// between the two runs cancels.
		ts = append(ts, target{"decision logs (default sampling): CPU vs allow-all, over the same without",
			(float64(logWarm) / float64(logFloor)) / (float64(grpcWarm) / float64(grpcFloor)), 1.05, false})
	}
	for _, o := range otlpRuns {
		if grpcWarm > 0 {
			t, floor := o[1].(time.Duration), o[2].(time.Duration)
			ts = append(ts, target{o[0].(string) + ": CPU vs allow-all, over the same without an exporter",
				(float64(t) / float64(floor)) / (float64(grpcWarm) / float64(grpcFloor)), 1.1, false})
		}
	}
	if distinctT > 0 && tenantsT > 0 {
		// Both against their own allow-all runs: the machine's drift
		// between the workloads cancels.
		ts = append(ts, target{"tenants: CPU vs allow-all, over distinct tokens of one issuer's",
			(float64(tenantsT) / float64(tenantsFloor)) / (float64(distinctT) / float64(distinctFloor)), 1.05, false})
	}
	ts = append(ts, opa...)
	for _, t := range ts {
		verdict := "met"
		if (t.higher && t.got < t.limit) || (!t.higher && t.got > t.limit) {
			verdict = "MISSED"
		}
		op := "<="
		if t.higher {
			op = ">="
		}
		fmt.Fprintf(w, "%-70s %6.2fx (target %s %.2fx) %s\n", t.what, t.got, op, t.limit, verdict)
	}
	if tenantsRSS > 0 {
		verdict := "met"
		if tenantsRSS > 150 {
			verdict = "MISSED"
		}
		fmt.Fprintf(w, "%-70s %6.1f MiB (target <= 150 MiB) %s\n", "tenants: RSS with every tenant's key set held", tenantsRSS, verdict)
	}
}

// httpRun sends n nginx-shaped authorization requests (GET /nginx with the
// original request in X-Original-* headers) with the concurrency of the
// gRPC runs, over HTTP/1.1 keep-alive, and reports as ghz does.
func httpRun(addr, token string, n int) (*ghzReport, error) {
	tr := &http.Transport{MaxIdleConnsPerHost: *concurrency, MaxConnsPerHost: *concurrency}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	var (
		mu   sync.Mutex
		lats = make([]time.Duration, 0, n)
		ok   int
		next = make(chan struct{}, n)
		wg   sync.WaitGroup
	)
	for range n {
		next <- struct{}{}
	}
	close(next)
	start := time.Now()
	for range *concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/nginx", nil)
				req.Header.Set("X-Original-URI", "/api/orders/1")
				req.Header.Set("X-Original-Method", "GET")
				req.Header.Set("X-Forwarded-Host", "api.example.com")
				req.Header.Set("X-Forwarded-Proto", "https")
				req.Header.Set("Authorization", "Bearer "+token)
				t0 := time.Now()
				resp, err := client.Do(req)
				took := time.Since(t0)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				mu.Lock()
				lats = append(lats, took)
				if err == nil && resp.StatusCode == http.StatusOK {
					ok++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if ok != n {
		return nil, fmt.Errorf("http: %d of %d checks allowed", ok, n)
	}
	slices.Sort(lats)
	r := &ghzReport{Count: n, RPS: float64(n) / elapsed.Seconds()}
	for _, p := range []int{50, 99} {
		r.Latency = append(r.Latency, struct {
			Percentage int   `json:"percentage"`
			Latency    int64 `json:"latency"`
		}{p, int64(lats[len(lats)*p/100])})
	}
	return r, nil
}

// median is the run with the median CPU per check, with the median
// throughput and latencies of all runs (each its own median).
func median(rs []result) result {
	mid := func(f func(r result) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	out := rs[0]
	out.cpuPerCheck = time.Duration(mid(func(r result) float64 { return float64(r.cpuPerCheck) }))
	out.rps = mid(func(r result) float64 { return r.rps })
	out.p50 = time.Duration(mid(func(r result) float64 { return float64(r.p50) }))
	out.p99 = time.Duration(mid(func(r result) float64 { return float64(r.p99) }))
	out.rssMiB = mid(func(r result) float64 { return r.rssMiB })
	return out
}

// tenantIdP is a multi-tenant identity provider on loopback: each realm
// serves its discovery document and a key set of the bench key (one key
// for every tenant: the workload is about tokenauthz holding thousands of
// issuers, not about the provider's keys).
type tenantIdP struct {
	*http.Server
	URL string
}

func startTenantIdP(key *rsa.PrivateKey) (*tenantIdP, error) {
	pub, err := jwk.FromRaw(key.Public())
	if err != nil {
		return nil, err
	}
	_ = pub.Set(jwk.KeyIDKey, "bench")
	_ = pub.Set(jwk.AlgorithmKey, "RS256")
	set := jwk.NewSet()
	_ = set.AddKey(pub)
	jwks, err := json.Marshal(set)
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &tenantIdP{URL: "http://" + lis.Addr().String()}
	p.Server = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		realm, what, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/realms/"), "/")
		w.Header().Set("Content-Type", "application/json")
		switch what {
		case ".well-known/openid-configuration":
			iss := p.URL + "/realms/" + realm
			_ = json.NewEncoder(w).Encode(map[string]string{"issuer": iss, "jwks_uri": iss + "/certs"})
		case "certs":
			w.Header().Set("Cache-Control", "max-age=3600")
			_, _ = w.Write(jwks)
		default:
			http.NotFound(w, r)
		}
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = p.Serve(lis) }()
	return p, nil
}

// mintTenants signs n RS256 tokens spread over the given number of tenants.
func mintTenants(key *rsa.PrivateKey, idpURL string, tenants, n int) []string {
	return signAll(key, n, func(i int, now int64) string {
		return fmt.Sprintf(`{"iss":"%s/realms/tenant-%05d","aud":"api","sub":"user-%d","scope":"read write","iat":%d,"exp":%d}`,
			idpURL, i%tenants, i, now, now+7200)
	})
}

// otlpSink accepts OTLP/HTTP exports and discards them: the exporter's
// work is tokenauthz's, the collector's is not.
type otlpSink struct {
	*http.Server
	URL string
}

func startOTLPSink() (*otlpSink, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &otlpSink{URL: "http://" + lis.Addr().String(), Server: &http.Server{ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Type", "application/x-protobuf")
			w.WriteHeader(http.StatusOK)
		})}}
	go func() { _ = s.Serve(lis) }()
	return s, nil
}

// Markers of the generated section in -markdown's file.
const (
	beginMarker = "<!-- loadbench:begin (generated by go run ./cmd/loadbench -markdown docs/performance.md) -->"
	endMarker   = "<!-- loadbench:end -->"
)

// writeMarkdown replaces the section between the markers in path with the
// report and the machine it ran on.
func writeMarkdown(path, report string) error {
	doc, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	before, rest, ok := strings.Cut(string(doc), beginMarker)
	_, after, ok2 := strings.Cut(rest, endMarker)
	if !ok || !ok2 {
		return fmt.Errorf("%s: no section between %q and %q", path, beginMarker, endMarker)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n\nRun on %s: %s, %d cores, %s, %s; `-n %d -c %d -runs %d`.\n\n```text%s```\n\n%s",
		beginMarker, time.Now().UTC().Format("2006-01-02"), cpuModel(), runtime.NumCPU(), kernel(), runtime.Version(),
		*requests, *concurrency, *runs, report, endMarker)
	return os.WriteFile(path, []byte(before+b.String()+after), 0o644)
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}

func kernel() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return runtime.GOOS
	}
	return "Linux " + strings.TrimSpace(string(b))
}
