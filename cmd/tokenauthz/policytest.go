package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
)

// testSuite is a policy test file (tokenauthz test): the config it tests,
// tokens the runner mints, what the providers answer, and the cases.
type testSuite struct {
	Config string `yaml:"config"`
	// Tokens are minted with a key the runner makes; the named issuer's key
	// source is replaced by it for the run (no identity provider needed).
	Tokens map[string]testToken `yaml:"tokens"`
	// Userinfo is what the userinfo endpoint answers, by sub.
	Userinfo map[string]map[string]any `yaml:"userinfo"`
	// Introspection is what the introspection endpoint answers, by opaque
	// token (any other token: active false).
	Introspection map[string]map[string]any `yaml:"introspection"`
	Cases         []testCase                `yaml:"cases"`
}

type testToken struct {
	Issuer string `yaml:"issuer"`
	// Tenant fills an issuer template's {tenant} in the token's iss
	// (default: the first of tenants.allow).
	Tenant string         `yaml:"tenant"`
	Claims map[string]any `yaml:"claims"`
	// ExpiresIn is the lifetime from now (negative: expired). Default 1h.
	ExpiresIn *time.Duration `yaml:"expires_in"`
	// DPoPKey binds the token to the named DPoP key (cnf.jkt).
	DPoPKey string `yaml:"dpop_key"`
}

type testCase struct {
	Name    string `yaml:"name"`
	Request struct {
		Method string `yaml:"method"`
		Path   string `yaml:"path"`
		Host   string `yaml:"host"`
		// Token names a token of the suite, or is an opaque token as it is.
		Token   string            `yaml:"token"`
		Headers map[string]string `yaml:"headers"`
		// DPoP sends the token with the DPoP scheme and a proof signed
		// with the named key.
		DPoP *struct {
			Key string `yaml:"key"`
		} `yaml:"dpop"`
		// ClientCert is a PEM file: the client certificate, as Envoy's
		// peer certificate.
		ClientCert string `yaml:"client_cert"`
		// Route names the route as Envoy's context_extensions would.
		Route string `yaml:"route"`
	} `yaml:"request"`
	Expect struct {
		Decision string            `yaml:"decision"` // allow or deny
		Status   int               `yaml:"status"`
		Reason   string            `yaml:"reason"`
		Headers  map[string]string `yaml:"headers"` // set on allow ("" : not set)
	} `yaml:"expect"`
}

// testRun is one case's outcome.
type testRun struct {
	file, name string
	failure    string // "" when it passed
	took       time.Duration
}

// policyTests runs the suites in paths (files, or directories of *_test.yaml).
func policyTests(paths []string, junit string, coverage bool, stdout, stderr io.Writer) int {
	var files []string
	for _, p := range paths {
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			m, _ := filepath.Glob(filepath.Join(p, "*_test.yaml"))
			files = append(files, m...)
			continue
		}
		files = append(files, p)
	}
	if len(files) == 0 {
		fmt.Fprintln(stderr, "test: no test files (give files, or directories holding *_test.yaml)")
		return 2
	}
	var runs []testRun
	cov := newCoverage()
	for _, f := range files {
		r, err := runSuite(f, cov, stdout)
		if err != nil {
			fmt.Fprintf(stderr, "%s: %v\n", f, err)
			return 2
		}
		runs = append(runs, r...)
	}
	failed := 0
	for _, r := range runs {
		if r.failure != "" {
			failed++
		}
	}
	if coverage {
		cov.report(stdout)
	}
	if junit != "" {
		if err := writeJUnit(junit, runs); err != nil {
			fmt.Fprintln(stderr, err)
			return 2
		}
	}
	fmt.Fprintf(stdout, "%d passed, %d failed\n", len(runs)-failed, failed)
	if failed > 0 {
		return 1
	}
	return 0
}

func runSuite(file string, cov *coverage, out io.Writer) ([]testRun, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var suite testSuite
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&suite); err != nil {
		return nil, fmt.Errorf("%v", err)
	}
	if suite.Config == "" {
		return nil, errors.New("config: required (the tokenauthz config the cases run against)")
	}
	cfgPath := suite.Config
	if !filepath.IsAbs(cfgPath) {
		cfgPath = filepath.Join(filepath.Dir(file), cfgPath)
	}
	cfg, err := loadConfigForTests(cfgPath)
	if err != nil {
		return nil, err
	}
	env, err := newTestEnv(&suite, cfg)
	if err != nil {
		return nil, err
	}
	defer env.close()
	cov.add(&cfg.Config)
	var runs []testRun
	for _, tc := range suite.Cases {
		start := time.Now()
		failure, steps := env.run(tc, cov)
		runs = append(runs, testRun{file: file, name: tc.Name, failure: failure, took: time.Since(start)})
		if failure == "" {
			fmt.Fprintf(out, "ok    %s: %s\n", filepath.Base(file), tc.Name)
			continue
		}
		fmt.Fprintf(out, "FAIL  %s: %s: %s\n", filepath.Base(file), tc.Name, failure)
		for i, s := range steps {
			fmt.Fprintf(out, "        %d. %s\n", i+1, strings.ReplaceAll(s, "\n", "\n           "))
		}
	}
	return runs, nil
}

// loadConfigForTests reads a config as the service would, but without the
// files and settings a test run replaces or does not use (key set and
// secret files, the admin token, TLS, Redis): a CI job has none of them.
func loadConfigForTests(path string) (*fileConfig, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var raw fileConfig
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&raw); err != nil {
		return parseConfig(data, path) // reports the problem with its line
	}
	raw.Server = serverConfig{}
	raw.Cache.Redis = nil
	// A stand-in key set and client secret, for validation only: the run
	// replaces both (newTestEnv).
	_, k, err := testKey([]string{"ES256"})
	if err != nil {
		return nil, err
	}
	pub, _ := k.PublicKey()
	set := jwk.NewSet()
	_ = set.AddKey(pub)
	standIn, _ := json.Marshal(set)
	_ = os.Setenv("TOKENAUTHZ_TEST_UNUSED", "stand-in")
	for i := range raw.Issuers {
		is := &raw.Issuers[i]
		if is.JWKSFile != "" || is.JWKSURI != "" || is.Discovery {
			is.JWKSFile, is.JWKSURI, is.Discovery, is.JWKS = "", "", false, string(standIn)
		}
		is.HMACSecretFile, is.HMACSecretEnv = "", ""
		if in := is.Introspection; in != nil {
			in.ClientSecretFile, in.ClientSecretEnv = "", "TOKENAUTHZ_TEST_UNUSED"
			if in.Endpoint == "" {
				in.Endpoint = "https://" + "introspection.invalid/"
			}
		}
		if ui := is.Userinfo; ui != nil && ui.Endpoint == "" {
			ui.Endpoint = "https://userinfo.invalid/"
		}
	}
	b, err := yaml.Marshal(&raw)
	if err != nil {
		return nil, err
	}
	return parseConfig(b, path)
}

// testEnv is a suite's world: the config with its issuers' keys replaced,
// a local provider for introspection and userinfo, the minted tokens.
type testEnv struct {
	srv      *authz.Server
	provider *httptest.Server
	tokens   map[string]string
	dpop     map[string]jwk.Key
}

func newTestEnv(suite *testSuite, cfg *fileConfig) (*testEnv, error) {
	env := &testEnv{tokens: map[string]string{}, dpop: map[string]jwk.Key{}}
	env.provider = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch r.URL.Path {
		case "/introspect":
			_ = r.ParseForm()
			a, ok := suite.Introspection[r.PostForm.Get("token")]
			if !ok {
				a = map[string]any{"active": false}
			}
			_ = json.NewEncoder(w).Encode(a)
		case "/userinfo":
			sub := subOf(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "), suite)
			ui, ok := suite.Userinfo[sub]
			if !ok {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			ui = maps(ui, map[string]any{"sub": sub})
			_ = json.NewEncoder(w).Encode(ui)
		default:
			http.NotFound(w, r)
		}
	}))
	secret := filepath.Join(os.TempDir(), fmt.Sprintf("tokenauthz-test-secret-%d", time.Now().UnixNano()))
	if err := os.WriteFile(secret, []byte("test-client-secret"), 0o600); err != nil {
		return nil, err
	}
	defer os.Remove(secret)
	keys := map[string]jwk.Key{}
	algs := map[string]jwa.SignatureAlgorithm{}
	for i := range cfg.Issuers {
		is := &cfg.Issuers[i]
		alg, key, err := testKey(is.Algorithms)
		if err != nil {
			return nil, fmt.Errorf("issuer %s: %v", is.Name, err)
		}
		pub, _ := key.PublicKey()
		set := jwk.NewSet()
		_ = set.AddKey(pub)
		b, _ := json.Marshal(set)
		is.JWKS, is.JWKSURI, is.JWKSFile, is.Discovery = string(b), "", "", false
		is.HMACSecretFile, is.HMACSecretEnv = "", ""
		is.Algorithms = slices.DeleteFunc(slices.Clone(is.Algorithms), func(a string) bool { return strings.HasPrefix(a, "HS") })
		keys[is.Name], algs[is.Name] = key, alg
		if in := is.Introspection; in != nil {
			in.Endpoint, in.AllowHTTP, in.ClientSecretFile, in.ClientSecretEnv = env.provider.URL+"/introspect", true, secret, ""
		}
		if ui := is.Userinfo; ui != nil {
			ui.Endpoint, ui.AllowHTTP = env.provider.URL+"/userinfo", true
		}
	}
	v, err := verify.New(cfg.Issuers, verify.Options{})
	if err != nil {
		return nil, err
	}
	if env.srv, err = authz.NewServer(&cfg.Config, v, slog.New(slog.DiscardHandler)); err != nil {
		return nil, err
	}
	names := make([]string, 0, len(suite.Tokens))
	for n := range suite.Tokens {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		tt := suite.Tokens[n]
		var is *verify.IssuerConfig
		for i := range cfg.Issuers {
			if cfg.Issuers[i].Name == tt.Issuer {
				is = &cfg.Issuers[i]
			}
		}
		if is == nil {
			return nil, fmt.Errorf("tokens.%s.issuer: no issuer named %q in %s", n, tt.Issuer, suite.Config)
		}
		claims := maps(tt.Claims, nil)
		now := time.Now()
		ttl := time.Hour
		if tt.ExpiresIn != nil {
			ttl = *tt.ExpiresIn
		}
		iss := is.Issuer
		if is.IssuerTemplate != "" {
			tenant := tt.Tenant
			if tenant == "" && is.Tenants != nil && len(is.Tenants.Allow) > 0 {
				tenant = is.Tenants.Allow[0]
			}
			if tenant == "" {
				return nil, fmt.Errorf("tokens.%s.tenant: required for issuer %s (an issuer template)", n, is.Name)
			}
			iss = strings.Replace(is.IssuerTemplate, "{tenant}", tenant, 1)
		} else if tt.Tenant != "" {
			return nil, fmt.Errorf("tokens.%s.tenant: issuer %s is not an issuer template", n, is.Name)
		}
		defaults := map[string]any{"iss": iss, "iat": now.Unix() - 1, "exp": now.Add(ttl).Unix()}
		if len(is.Audiences) > 0 {
			defaults["aud"] = is.Audiences[0]
		}
		for k, val := range defaults {
			if _, set := claims[k]; !set {
				claims[k] = val
			}
		}
		if tt.DPoPKey != "" {
			k, err := env.dpopKey(tt.DPoPKey)
			if err != nil {
				return nil, err
			}
			jkt, err := thumbprint(k)
			if err != nil {
				return nil, err
			}
			claims["cnf"] = map[string]any{"jkt": jkt}
		}
		payload, _ := json.Marshal(claims)
		hdr := jws.NewHeaders()
		_ = hdr.Set(jws.TypeKey, "JWT")
		signed, err := jws.Sign(payload, jws.WithKey(algs[is.Name], keys[is.Name], jws.WithProtectedHeaders(hdr)))
		if err != nil {
			return nil, err
		}
		env.tokens[n] = string(signed)
	}
	return env, nil
}

func (env *testEnv) close() { env.provider.Close() }

func (env *testEnv) dpopKey(name string) (jwk.Key, error) {
	if k, ok := env.dpop[name]; ok {
		return k, nil
	}
	raw, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	k, err := jwk.FromRaw(raw)
	if err != nil {
		return nil, err
	}
	env.dpop[name] = k
	return k, nil
}

// testKey makes a key for the first asymmetric algorithm an issuer allows.
func testKey(algs []string) (jwa.SignatureAlgorithm, jwk.Key, error) {
	for _, a := range algs {
		var raw any
		var err error
		switch {
		case a == "ES256":
			raw, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		case a == "ES384":
			raw, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		case a == "ES512":
			raw, err = ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
		case strings.HasPrefix(a, "RS") || strings.HasPrefix(a, "PS"):
			raw, err = rsa.GenerateKey(rand.Reader, 2048)
		default:
			continue
		}
		if err != nil {
			return "", nil, err
		}
		k, err := jwk.FromRaw(raw)
		if err != nil {
			return "", nil, err
		}
		_ = k.Set(jwk.KeyIDKey, "tokenauthz-test")
		_ = k.Set(jwk.AlgorithmKey, a)
		return jwa.SignatureAlgorithm(a), k, nil
	}
	return "", nil, errors.New("allows no asymmetric algorithm (ES256, RS256, PS256, …): the test runner mints with one")
}

// run decides one case and compares; it returns the failure ("" for a
// pass) and the decision's steps.
func (env *testEnv) run(tc testCase, cov *coverage) (string, []string) {
	rq := tc.Request
	method, host, path := orDefault(rq.Method, "GET"), orDefault(rq.Host, "api.example.com"), orDefault(rq.Path, "/")
	tok := rq.Token
	if t, ok := env.tokens[tok]; ok {
		tok = t
	}
	hdrs := map[string]string{":method": method, ":path": path, ":authority": host}
	for k, v := range rq.Headers {
		hdrs[strings.ToLower(k)] = v
	}
	if tok != "" {
		hdrs["authorization"] = "Bearer " + tok
	}
	if rq.DPoP != nil {
		k, err := env.dpopKey(rq.DPoP.Key)
		if err != nil {
			return err.Error(), nil
		}
		pathOnly, _, _ := strings.Cut(path, "?")
		proof, err := signProof(k, method, "https://"+host+pathOnly, tok, "")
		if err != nil {
			return err.Error(), nil
		}
		hdrs["authorization"], hdrs["dpop"] = "DPoP "+tok, proof
	}
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: method, Path: path, Host: host, Scheme: "https", Headers: hdrs}},
		Source: &authv3.AttributeContext_Peer{}}}
	if rq.Route != "" {
		req.Attributes.ContextExtensions = map[string]string{"route": rq.Route}
	}
	if rq.ClientCert != "" {
		pem, err := os.ReadFile(rq.ClientCert)
		if err != nil {
			return err.Error(), nil
		}
		req.Attributes.Source.Certificate = url.QueryEscape(string(pem))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, e := env.srv.ExplainDecision(ctx, req)
	cov.saw(e, resp)

	var problems []string
	allow := codes.Code(resp.GetStatus().GetCode()) == codes.OK
	decision, status := "deny", int(resp.GetDeniedResponse().GetStatus().GetCode())
	if resp.GetErrorResponse() != nil {
		status = int(resp.GetErrorResponse().GetStatus().GetCode())
	}
	if allow {
		decision, status = "allow", 200
	}
	want := tc.Expect
	if want.Decision != "" && want.Decision != decision {
		problems = append(problems, fmt.Sprintf("decision %s, want %s", decision, want.Decision))
	}
	if want.Status != 0 && want.Status != status {
		problems = append(problems, fmt.Sprintf("status %d, want %d", status, want.Status))
	}
	if want.Reason != "" && want.Reason != e.Reason {
		problems = append(problems, fmt.Sprintf("reason %s, want %s", e.Reason, want.Reason))
	}
	set := map[string]string{}
	for _, h := range resp.GetOkResponse().GetHeaders() {
		set[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	for k, v := range want.Headers {
		if got, ok := set[strings.ToLower(k)]; got != v || v == "" && ok {
			problems = append(problems, fmt.Sprintf("header %s %q, want %q", k, got, v))
		}
	}
	if len(problems) == 0 {
		return "", e.Steps
	}
	return strings.Join(problems, "; "), e.Steps
}

func orDefault(v, d string) string {
	if v == "" {
		return d
	}
	return v
}

func maps(m, extra map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range m {
		out[k] = v
	}
	for k, v := range extra {
		out[k] = v
	}
	return out
}

// subOf is the sub a token stands for: a minted token's claim, or the
// introspection answer's.
func subOf(tok string, suite *testSuite) string {
	if a, ok := suite.Introspection[tok]; ok {
		s, _ := a["sub"].(string)
		return s
	}
	if parts := strings.Split(tok, "."); len(parts) == 3 {
		var c struct {
			Sub string `json:"sub"`
		}
		if b, err := jwsPayload(parts[1]); err == nil && json.Unmarshal(b, &c) == nil {
			return c.Sub
		}
	}
	return ""
}

// coverage records which rules the cases exercised.
type coverage struct {
	routes  []string
	whens   map[string][2]bool // "route when[i] (expr)" → outcomes seen: false, true
	order   []string
	headers map[string]bool // "route: header" → set at least once
	hdrKeys []string
	hit     map[string]bool
}

func newCoverage() *coverage {
	return &coverage{whens: map[string][2]bool{}, headers: map[string]bool{}, hit: map[string]bool{}}
}

func (c *coverage) add(cfg *authz.Config) {
	for _, r := range cfg.Routes {
		if !slices.Contains(c.routes, r.Name) {
			c.routes = append(c.routes, r.Name)
		}
		for i, w := range r.When {
			k := fmt.Sprintf("route %s: when[%d] %s", r.Name, i, w.CEL)
			if _, ok := c.whens[k]; !ok {
				c.whens[k] = [2]bool{}
				c.order = append(c.order, k)
			}
		}
		if r.Anonymous {
			continue // sets no claim header
		}
		for h := range mergeHeaders(cfg.Headers, r.Headers) {
			k := fmt.Sprintf("route %s: header %s", r.Name, h)
			if _, ok := c.headers[k]; !ok {
				c.headers[k] = false
				c.hdrKeys = append(c.hdrKeys, k)
			}
		}
	}
}

func mergeHeaders(top, own map[string]*authz.HeaderSource) map[string]bool {
	out := map[string]bool{}
	for h := range top {
		out[h] = true
	}
	for h, src := range own {
		out[h] = src != nil
	}
	for h, on := range out {
		if !on {
			delete(out, h)
		}
	}
	return out
}

func (c *coverage) saw(e *authz.Explanation, resp *authv3.CheckResponse) {
	c.hit[e.Route] = true
	for _, w := range e.When {
		k := fmt.Sprintf("route %s: when[%d] %s", w.Route, w.Index, w.Expr)
		o := c.whens[k]
		if w.Err == nil {
			o[boolIndex(w.Result)] = true
		}
		c.whens[k] = o
	}
	for _, h := range resp.GetOkResponse().GetHeaders() {
		c.headers[fmt.Sprintf("route %s: header %s", e.Route, h.GetHeader().GetKey())] = true
	}
}

func boolIndex(b bool) int {
	if b {
		return 1
	}
	return 0
}

// report lists what no case exercised.
func (c *coverage) report(w io.Writer) {
	var gaps []string
	for _, r := range c.routes {
		if !c.hit[r] {
			gaps = append(gaps, fmt.Sprintf("route %s: no case reached it", r))
		}
	}
	for _, k := range c.order {
		switch o := c.whens[k]; {
		case !o[0] && !o[1]:
			gaps = append(gaps, k+": never evaluated")
		case !o[0]:
			gaps = append(gaps, k+": only true seen")
		case !o[1]:
			gaps = append(gaps, k+": only false seen")
		}
	}
	for _, k := range c.hdrKeys {
		if !c.headers[k] {
			gaps = append(gaps, k+": never set")
		}
	}
	fmt.Fprintf(w, "coverage: %d routes, %d when conditions, %d header rules; not exercised: %d\n",
		len(c.routes), len(c.order), len(c.hdrKeys), len(gaps))
	for _, g := range gaps {
		fmt.Fprintf(w, "  %s\n", g)
	}
}

// writeJUnit writes the runs in the JUnit XML that CI systems read.
func writeJUnit(path string, runs []testRun) error {
	type failure struct {
		Message string `xml:"message,attr"`
	}
	type testcase struct {
		Name      string   `xml:"name,attr"`
		Classname string   `xml:"classname,attr"`
		Time      string   `xml:"time,attr"`
		Failure   *failure `xml:"failure,omitempty"`
	}
	type testsuite struct {
		XMLName  xml.Name   `xml:"testsuite"`
		Name     string     `xml:"name,attr"`
		Tests    int        `xml:"tests,attr"`
		Failures int        `xml:"failures,attr"`
		Cases    []testcase `xml:"testcase"`
	}
	s := testsuite{Name: "tokenauthz policy tests", Tests: len(runs)}
	for _, r := range runs {
		tc := testcase{Name: r.name, Classname: filepath.Base(r.file), Time: fmt.Sprintf("%.3f", r.took.Seconds())}
		if r.failure != "" {
			s.Failures++
			tc.Failure = &failure{Message: r.failure}
		}
		s.Cases = append(s.Cases, tc)
	}
	b, err := xml.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append([]byte(xml.Header), b...), 0o644)
}
