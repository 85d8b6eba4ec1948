package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/authz/decisionlog"
	"github.com/tokenauthz/tokenauthz/authz/httpauthz"
	"github.com/tokenauthz/tokenauthz/authz/kube"
	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/deploy"
)

// fileConfig is the whole configuration file: the server's own settings
// plus the decision policy (authz.Config) at the top level.
type fileConfig struct {
	Server     serverConfig `yaml:"server"`
	Cache      cache.Config `yaml:"cache"`
	Kubernetes kube.Config  `yaml:"kubernetes"`
	// HTTPAuthz configures the HTTP authorization endpoint
	// (server.http_authz_addr): which proxies' request shapes it takes and
	// which proxies may call it.
	HTTPAuthz httpauthz.Config `yaml:"http_authz"`
	// DecisionLog, when set, writes one structured event per (sampled)
	// decision: JSON lines on stdout, or OTLP logs.
	DecisionLog  *decisionlog.Config `yaml:"decision_log"`
	authz.Config `yaml:",inline"`
}

type serverConfig struct {
	// GRPCAddr is where Envoy calls Check: host:port, or unix:///path for a
	// unix domain socket. Default ":9191".
	GRPCAddr string `yaml:"grpc_addr"`
	// TLS, when set, serves the gRPC port over TLS (mutual TLS with
	// client_ca_file); the files are reloaded when they change.
	TLS *tlsConfig `yaml:"tls"`
	// HTTPAddr serves /healthz and /readyz. Default ":9090"; "off" disables.
	HTTPAddr string `yaml:"http_addr"`
	// Reflection registers gRPC server reflection (so grpcurl needs no proto
	// files). Default true; it exposes only the public API schema.
	Reflection *bool `yaml:"reflection"`
	// LogFormat is json (default) or text.
	LogFormat string `yaml:"log_format"`
	// LogLevel is debug, info (default), warn or error.
	LogLevel string `yaml:"log_level"`
	// Lameduck: on SIGTERM, health turns NOT_SERVING and checks are still
	// answered for this long, while Kubernetes and Envoy take the pod out of
	// rotation. Default 0; 5s suits Kubernetes.
	Lameduck time.Duration `yaml:"lameduck"`
	// ShutdownTimeout bounds the graceful drain of in-flight checks after
	// the lameduck pause; then the server stops hard. Default 15s.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// HTTPAuthzAddr serves the HTTP authorization endpoint (nginx
	// auth_request, Traefik forwardAuth, Envoy http_service) on a listener
	// of its own, never the admin or metrics one. Default off.
	HTTPAuthzAddr string `yaml:"http_authz_addr"`
	// AdminAddr serves the admin API on a listener of its own (host:port),
	// off the health and metrics port; default: on http_addr.
	AdminAddr string `yaml:"admin_addr"`
	// AdminTokenFile / AdminTokenEnv hold the bearer token of the admin API
	// (POST /admin/revoke on the HTTP port). Without one the API is off.
	AdminTokenFile string `yaml:"admin_token_file"`
	AdminTokenEnv  string `yaml:"admin_token_env"`
	// RevocationTTL is how long a revocation is kept when the call names no
	// ttl: make it at least your tokens' lifetime. Default 24h.
	RevocationTTL time.Duration `yaml:"revocation_ttl"`
	// ReadinessGrace: report ready after this long even if some issuer's
	// keys have not loaded (its tokens get 503s meanwhile). Default 0: wait
	// for every issuer.
	ReadinessGrace time.Duration `yaml:"readiness_grace"`
	// LogAllows is the fraction of allows logged (0 to 1; denies are always
	// logged). Default 0.
	LogAllows float64 `yaml:"log_allows"`
	// TraceSubject adds the token's sub to decision spans (enduser.id).
	// Personal data: default false.
	TraceSubject bool `yaml:"trace_subject"`
}

// validateAddrs checks the listen addresses: host:port (host may be empty
// for every interface), unix:///path for gRPC, off for HTTP.
func (s *serverConfig) validateAddrs() []string {
	var p []string
	check := func(key, addr string, unixOK bool) {
		if unixOK && (strings.HasPrefix(addr, "unix://") || strings.HasPrefix(addr, "unix:")) {
			if strings.TrimPrefix(strings.TrimPrefix(addr, "unix://"), "unix:") == "" {
				p = append(p, key+": a unix socket needs a path (unix:///run/tokenauthz.sock)")
			}
			return
		}
		_, port, err := net.SplitHostPort(addr)
		if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 0 || n > 65535 {
			p = append(p, fmt.Sprintf("%s: %q is not host:port (like :9191 or 127.0.0.1:9191)", key, addr))
		}
	}
	check("server.grpc_addr", s.GRPCAddr, true)
	if s.HTTPAuthzAddr != "" {
		check("server.http_authz_addr", s.HTTPAuthzAddr, false)
		if !strings.HasSuffix(s.HTTPAuthzAddr, ":0") && (s.HTTPAuthzAddr == s.HTTPAddr || s.HTTPAuthzAddr == s.AdminAddr) {
			p = append(p, "server.http_authz_addr: a listener of its own, not the metrics or admin one")
		}
	}
	if s.AdminAddr != "" {
		check("server.admin_addr", s.AdminAddr, false)
	}
	if s.HTTPAddr != "off" {
		check("server.http_addr", s.HTTPAddr, false)
	}
	return p
}

func (s *serverConfig) applyDefaults() {
	if s.GRPCAddr == "" {
		s.GRPCAddr = ":9191"
	}
	if s.HTTPAddr == "" {
		s.HTTPAddr = ":9090"
	}
	if s.Reflection == nil {
		t := true
		s.Reflection = &t
	}
	if s.LogFormat == "" {
		s.LogFormat = "json"
	}
	if s.LogLevel == "" {
		s.LogLevel = "info"
	}
	if s.ShutdownTimeout == 0 {
		s.ShutdownTimeout = 15 * time.Second
	}
	if s.RevocationTTL == 0 {
		s.RevocationTTL = 24 * time.Hour
	}
}

// configError lists every problem found in a configuration file.
type configError struct {
	file     string
	problems []string
}

func (e *configError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %d problem(s):", e.file, len(e.problems))
	for _, p := range e.problems {
		b.WriteString("\n  ")
		b.WriteString(p)
	}
	return b.String()
}

// loadConfig reads path ("" for the embedded demo config), decodes it
// strictly (unknown keys are errors) and validates it. Every problem is
// reported, each with its line or key.
func loadConfig(path string) (*fileConfig, error) {
	data, name := deploy.DemoConfig, "embedded demo config (deploy/demo/config.yaml)"
	if path != "" {
		var err error
		if data, err = os.ReadFile(path); err != nil {
			return nil, err
		}
		name = path
	}
	return parseConfig(data, name)
}

func parseConfig(data []byte, name string) (*fileConfig, error) {
	var cfg fileConfig
	var problems []string
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		var te *yaml.TypeError
		switch {
		case errors.Is(err, io.EOF):
			return nil, &configError{file: name, problems: []string{"the file is empty"}}
		case errors.As(err, &te):
			// yaml.v3 decodes what it can and lists every unknown key and
			// type mismatch, so validation can report its problems too.
			for _, e := range te.Errors {
				problems = append(problems, friendlyYAML(e, data))
			}
		default:
			return nil, &configError{file: name, problems: []string{err.Error()}}
		}
	}
	var extra any
	if dec.Decode(&extra) != io.EOF {
		problems = append(problems, "more than one YAML document")
	}
	cfg.Server.applyDefaults()
	problems = append(problems, cfg.Server.validateAddrs()...)
	cfg.Config.RoutesFromResources = cfg.Kubernetes.Enabled
	problems = append(problems, cfg.Config.Validate()...)
	problems = append(problems, cfg.Kubernetes.Validate()...)
	problems = append(problems, cfg.HTTPAuthz.Validate()...)
	if cfg.DecisionLog != nil {
		problems = append(problems, cfg.DecisionLog.Validate()...)
	}
	problems = append(problems, cfg.Cache.Validate()...)
	switch cfg.Server.LogFormat {
	case "json", "text":
	default:
		problems = append(problems, "server.log_format: must be json or text")
	}
	if _, err := parseLevel(cfg.Server.LogLevel); err != nil {
		problems = append(problems, "server.log_level: "+err.Error())
	}
	if cfg.Server.TLS != nil {
		problems = append(problems, cfg.Server.TLS.validate()...)
	}
	if cfg.Server.Lameduck < 0 {
		problems = append(problems, "server.lameduck: must be positive")
	}
	if cfg.Server.ShutdownTimeout < 0 {
		problems = append(problems, "server.shutdown_timeout: must be positive")
	}
	if cfg.Server.LogAllows < 0 || cfg.Server.LogAllows > 1 {
		problems = append(problems, "server.log_allows: a fraction between 0 and 1")
	}
	if cfg.Server.ReadinessGrace < 0 {
		problems = append(problems, "server.readiness_grace: must be positive")
	}
	if cfg.Server.RevocationTTL < 0 {
		problems = append(problems, "server.revocation_ttl: must be positive")
	}
	if cfg.Server.AdminTokenFile != "" && cfg.Server.AdminTokenEnv != "" {
		problems = append(problems, "server.admin_token_file: set only one of admin_token_file, admin_token_env")
	} else if tok, err := cache.ReadSecret(cfg.Server.AdminTokenFile, cfg.Server.AdminTokenEnv); err != nil {
		problems = append(problems, cache.SecretKey("server.admin_token", cfg.Server.AdminTokenFile)+": "+err.Error())
	} else if tok != nil && len(tok) < 32 {
		problems = append(problems, fmt.Sprintf("%s: at least 32 characters, have %d", cache.SecretKey("server.admin_token", cfg.Server.AdminTokenFile), len(tok)))
	}
	if len(problems) > 0 {
		return nil, &configError{file: name, problems: problems}
	}
	return &cfg, nil
}

// referencedFiles are the files a config names whose contents a reload puts
// in force: issuers' key sets and secrets, the admin token, the Redis HMAC
// key. (TLS files have their own watch; the Redis password is read per
// connection.)
func (c *fileConfig) referencedFiles() []string {
	var files []string
	add := func(f string) {
		if f != "" {
			files = append(files, f)
		}
	}
	for _, is := range c.Issuers {
		add(is.JWKSFile)
		add(is.HMACSecretFile)
		if is.Introspection != nil {
			add(is.Introspection.ClientSecretFile)
		}
	}
	add(c.Server.AdminTokenFile)
	if rc := c.Cache.Redis; rc != nil {
		add(rc.HMACKeyFile)
	}
	return files
}

// yamlField and yamlUnmarshal match yaml.v3's decode errors, which name Go
// types; friendlyYAML rewrites them in the config's own terms.
var (
	yamlField     = regexp.MustCompile("^line (\\d+): field (\\S+) not found in type (\\S+)$")
	yamlUnmarshal = regexp.MustCompile("^line (\\d+): cannot unmarshal !!(\\w+) `(.*)` into (\\S+)$")
)

// friendlyYAML turns "field requierd_claims not found in type
// verify.IssuerConfig" into "line 7: unknown key requierd_claims (did you
// mean required_claims?)", and a duration without a unit into a hint.
func friendlyYAML(msg string, data []byte) string {
	if m := yamlField.FindStringSubmatch(msg); m != nil {
		out := fmt.Sprintf("line %s: unknown key %s", m[1], m[2])
		if s := nearest(m[2], knownKeys()[m[3]]); s != "" {
			out += fmt.Sprintf(" (did you mean %s?)", s)
		}
		return out
	}
	if m := yamlUnmarshal.FindStringSubmatch(msg); m != nil {
		key := keyOnLine(data, m[1], m[3])
		switch m[4] {
		case "time.Duration", "*time.Duration":
			why := "a number and a unit: ns, us, ms, s, m or h (like 30s, 500ms, 5m, 1h30m)"
			if _, err := strconv.ParseFloat(m[3], 64); err == nil {
				why = "durations need a unit, like 30s, 500ms or 5m"
			}
			return fmt.Sprintf("line %s: %s: %q is not a duration: %s", m[1], key, m[3], why)
		}
		want := map[string]string{"bool": "true or false", "int": "a whole number", "uint64": "a whole number",
			"float64": "a number", "string": "a string"}[m[4]]
		switch t := strings.TrimPrefix(m[4], "*"); {
		case want != "":
		case strings.HasPrefix(t, "[]"):
			want = "a list"
		default: // a map, or a section (a Go struct)
			want = "a mapping (key: value)"
		}
		return fmt.Sprintf("line %s: %s: %q is not %s", m[1], key, m[3], want)
	}
	return msg
}

// keyOnLine is the YAML key on a 1-based line whose value is value (in a
// flow mapping, several keys share the line), for messages.
func keyOnLine(data []byte, line, value string) string {
	n, _ := strconv.Atoi(line)
	lines := strings.Split(string(data), "\n")
	if n < 1 || n > len(lines) {
		return "the value"
	}
	l := lines[n-1]
	if m := regexp.MustCompile(`([A-Za-z0-9_.#-]+)\s*:\s*["']?` + regexp.QuoteMeta(value)).FindStringSubmatch(l); m != nil {
		return m[1]
	}
	l = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "- "))
	if k, _, ok := strings.Cut(l, ":"); ok && !strings.ContainsAny(k, "{[\"'") {
		return strings.TrimSpace(k)
	}
	return "the value"
}

// knownKeys maps each Go type of the config (as yaml.v3 names it) to its
// YAML keys.
var knownKeys = sync.OnceValue(func() map[string][]string {
	m := map[string][]string{}
	var walk func(t reflect.Type)
	walk = func(t reflect.Type) {
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice || t.Kind() == reflect.Map {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct || m[t.String()] != nil {
			return
		}
		m[t.String()] = []string{}
		var add func(t reflect.Type, into string)
		add = func(t reflect.Type, into string) {
			for i := range t.NumField() {
				f := t.Field(i)
				name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
				if strings.Contains(opts, "inline") {
					add(f.Type, into)
					continue
				}
				if name == "" || name == "-" {
					continue
				}
				m[into] = append(m[into], name)
				walk(f.Type)
			}
		}
		add(t, t.String())
	}
	walk(reflect.TypeFor[fileConfig]())
	return m
})

// nearest is the known key closest to key (edit distance at most 2, or a
// third of its length), or "".
func nearest(key string, known []string) string {
	best, bestD := "", min(2, len(key)/3)+1
	for _, k := range known {
		if d := editDistance(key, k); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// withDefaults is the config with every unset setting at the default in
// force (server defaults are applied when it is parsed).
func (c *fileConfig) withDefaults() *fileConfig {
	e := *c
	e.Config = c.Config.WithDefaults()
	e.Cache = c.Cache.WithDefaults()
	return &e
}
