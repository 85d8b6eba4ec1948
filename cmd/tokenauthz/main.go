// Command tokenauthz is an Envoy ext_authz v3 gRPC service that verifies
// bearer tokens locally. This package only wires: flags, configuration,
// logging, listeners, signals.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"

	"github.com/tokenauthz/tokenauthz/authz/kube"
	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/deploy"
	"github.com/tokenauthz/tokenauthz/verify"
)

// commands are the CLI's commands in the order usage lists them, with what
// each does. Their flags are not listed here: usage asks each command for
// its --help, so the two cannot disagree.
var commands = []struct{ name, summary string }{
	{"demo", "run on the demo config and show an allow and two denies through the real client"},
	{"serve", "run the service (no --config: the embedded demo config)"},
	{"validate", "check a config (--config) and, with -f, Kubernetes policy resources; exit 1 naming every problem"},
	{"test", "run policy test files (FILES or DIRS of *_test.yaml) through the real decision steps; exit 1 on a failure"},
	{"demo-token", "mint a token the demo config accepts (--bind-key: DPoP-bound to the key in FILE)"},
	{"dpop-proof", "print a DPoP proof (RFC 9449) for one request (--key, --url and a token are required)"},
	{"check", "explain the decision for one request, step by step (--token or --token-file)"},
	{"revoke", "revoke through a running instance's admin API (admin token from $TOKENAUTHZ_ADMIN_TOKEN or --admin-token-file)"},
	{"version", "print the version"},
}

// usage is the CLI's summary, built from each command's own flag set.
func usage() string {
	var b strings.Builder
	b.WriteString("tokenauthz: an Envoy ext_authz service that verifies bearer tokens locally.\n\nUsage:\n")
	for _, c := range commands {
		var help bytes.Buffer
		cli([]string{c.name, "--help"}, io.Discard, &help)
		line := "  tokenauthz " + c.name
		for _, l := range strings.Split(help.String(), "\n") {
			if !strings.HasPrefix(l, "  -") {
				continue
			}
			name, arg, _ := strings.Cut(strings.TrimPrefix(l, "  -"), " ")
			flag := "--" + name
			if len(name) == 1 {
				flag = "-" + name
			}
			if arg = strings.TrimSpace(arg); arg != "" {
				flag += " " + placeholder(name, arg)
			}
			if len(line)+len(flag)+3 > 100 {
				b.WriteString(line + "\n")
				line = "                       "
			}
			line += " [" + flag + "]"
		}
		b.WriteString(line + "\n")
		b.WriteString("        " + c.summary + "\n")
	}
	b.WriteString("\nEvery command takes --help.\n")
	return b.String()
}

func main() {
	os.Exit(cli(os.Args[1:], os.Stdout, os.Stderr))
}

func cli(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage())
		return 2
	}
	cmd, args := args[0], args[1:]
	fs := flag.NewFlagSet("tokenauthz "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	switch cmd {
	case "serve":
		config := fs.String("config", "", "configuration file (default: the embedded demo config)")
		grpcAddr := fs.String("grpc-addr", os.Getenv("TOKENAUTHZ_GRPC_ADDR"), "listen address for Check, over the config's server.grpc_addr ($TOKENAUTHZ_GRPC_ADDR)")
		httpAddr := fs.String("http-addr", os.Getenv("TOKENAUTHZ_HTTP_ADDR"), "listen address for health and metrics, over server.http_addr; off disables ($TOKENAUTHZ_HTTP_ADDR)")
		if code, ok := parseFlags(fs, args); !ok {
			return code
		}
		return serve(*config, *grpcAddr, *httpAddr, stdout, stderr)
	case "demo":
		grpcAddr := fs.String("grpc-addr", os.Getenv("TOKENAUTHZ_GRPC_ADDR"), "listen address for Check (default 127.0.0.1:9191)")
		httpAddr := fs.String("http-addr", os.Getenv("TOKENAUTHZ_HTTP_ADDR"), "listen address for health and metrics (default 127.0.0.1:9090; off disables)")
		once := fs.Bool("once", false, "exit after the three checks")
		if code, ok := parseFlags(fs, args); !ok {
			return code
		}
		return demo(*grpcAddr, *httpAddr, *once, stdout, stderr)
	case "validate":
		config := fs.String("config", "", "configuration file")
		reach := fs.Bool("reach", false, "also reach each issuer once (discovery, key set, introspection and userinfo endpoints)")
		var policies stringList
		fs.Var(&policies, "f", "a file (or a directory of *.yaml) of TokenPolicy, TokenIssuer and ClusterTokenIssuer resources to check against the config (repeatable)")
		namespace := fs.String("namespace", "default", "the namespace of -f resources that name none")
		strict := fs.Bool("strict", false, "treat warnings (valid but likely wrong) as errors")
		if code, ok := parseFlags(fs, args); !ok {
			return code
		}
		if *config == "" && len(policies) == 0 {
			fmt.Fprintln(stderr, "validate: --config is required (or -f with policy resources)")
			return 2
		}
		cfg := &fileConfig{Kubernetes: kube.Config{Enabled: true}}
		cfg.RoutesFromResources = true
		if *config != "" {
			var err error
			if cfg, err = loadConfig(*config); err != nil {
				fmt.Fprintln(stderr, err)
				return 1
			}
		}
		if len(policies) > 0 {
			docs := map[string][]byte{}
			var files []string
			for _, f := range policies {
				if st, err := os.Stat(f); err == nil && st.IsDir() {
					for _, pat := range []string{"*.yaml", "*.yml"} {
						m, _ := filepath.Glob(filepath.Join(f, pat))
						files = append(files, m...)
					}
					continue
				}
				files = append(files, f)
			}
			for _, f := range files {
				b, err := os.ReadFile(f)
				if err != nil {
					fmt.Fprintln(stderr, err)
					return 1
				}
				docs[f] = b
			}
			if problems := kube.ValidateDocuments(&cfg.Config, &cfg.Kubernetes, *namespace, docs); len(problems) > 0 {
				for _, p := range problems {
					fmt.Fprintln(stderr, p)
				}
				return 1
			}
			fmt.Fprintf(stdout, "%s: ok\n", strings.Join(policies, ", "))
			if *config == "" {
				return 0
			}
		}
		if *reach {
			v, err := verify.New(cfg.Issuers, verify.Options{})
			if err != nil {
				fmt.Fprintln(stderr, err)
				return 1
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			failed := false
			for _, r := range v.Probe(ctx) {
				if r.Err != nil {
					failed = true
					fmt.Fprintf(stderr, "issuers: %s: %s: %v\n", r.Issuer, r.What, r.Err)
				} else {
					fmt.Fprintf(stdout, "issuers: %s: %s: ok\n", r.Issuer, r.What)
				}
			}
			if failed {
				return 1
			}
		}
		if w := cfg.Warnings(); len(w) > 0 {
			for _, line := range w {
				fmt.Fprintln(stderr, "warning: "+line)
			}
			if *strict {
				fmt.Fprintf(stderr, "%s: %d warning(s), and --strict makes them errors\n", *config, len(w))
				return 1
			}
		}
		fmt.Fprintf(stdout, "%s: ok\n", *config)
		return 0
	case "test":
		junit := fs.String("junit", "", "also write the results as JUnit XML to FILE, for CI systems")
		cover := fs.Bool("coverage", false, "list routes, when conditions (and which outcomes) and header rules no case exercised")
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return 0
			}
			return 2
		}
		return policyTests(fs.Args(), *junit, *cover, stdout, stderr)
	case "demo-token":
		sub := fs.String("sub", "alice", "subject")
		scope := fs.String("scope", "read", "space-separated scopes")
		email := fs.String("email", "alice@example.com", "email claim (empty: none)")
		ttl := time.Hour
		fs.Var(durationFlag{&ttl}, "ttl", "lifetime, like 1h or 30m")
		bindKey := fs.String("bind-key", "", "bind the token to this DPoP key (a private JWK file; made if missing)")
		if code, ok := parseFlags(fs, args); !ok {
			return code
		}
		tok, err := demoToken(*sub, *scope, *email, ttl, *bindKey)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		fmt.Fprintln(stdout, tok)
		return 0
	case "dpop-proof":
		var o proofOptions
		fs.StringVar(&o.keyFile, "key", "", "the client's private JWK file (demo-token --bind-key makes one)")
		fs.StringVar(&o.method, "method", "GET", "the request's method (htm)")
		fs.StringVar(&o.url, "url", "", "the request's URL, scheme://host/path (htu; a query is left out)")
		fs.StringVar(&o.token, "token", "", "the access token the proof goes with (ath)")
		fs.StringVar(&o.tokenFile, "token-file", "", "a file holding the access token")
		fs.StringVar(&o.nonce, "nonce", "", "the server's DPoP-Nonce, when it asked for one")
		if code, ok := parseFlags(fs, args); !ok {
			return code
		}
		proof, err := dpopProof(o)
		if err != nil {
			fmt.Fprintln(stderr, "dpop-proof:", err)
			return 2
		}
		fmt.Fprintln(stdout, proof)
		return 0
	case "check":
		o := checkOptions{headers: headerFlags{}}
		fs.StringVar(&o.config, "config", "", "configuration file (default: the embedded demo config)")
		fs.StringVar(&o.token, "token", "", "the bearer token")
		fs.StringVar(&o.tokenFile, "token-file", "", "a file holding the bearer token (keeps it out of shell history)")
		fs.StringVar(&o.method, "method", "GET", "HTTP method")
		fs.StringVar(&o.path, "path", "/", "request path (with query, as Envoy sends it)")
		fs.StringVar(&o.host, "host", "localhost", "host (:authority)")
		fs.StringVar(&o.route, "route", "", "a route name, as Envoy's context_extensions would give it")
		fs.Var(o.headers, "header", "a request header name=value (repeatable)")
		if code, ok := parseFlags(fs, args); !ok {
			return code
		}
		return explain(o, stdout, stderr)
	case "revoke":
		var o revokeOptions
		fs.StringVar(&o.admin, "admin", "http://127.0.0.1:9090", "base URL of an instance's HTTP port")
		fs.StringVar(&o.adminTokenFile, "admin-token-file", "", "file holding the admin token (default: $TOKENAUTHZ_ADMIN_TOKEN)")
		fs.StringVar(&o.token, "token", "", "a token to revoke (hashed here; only the hash is sent)")
		fs.StringVar(&o.req.TokenSHA256, "token-sha256", "", "the hex SHA-256 of a token to revoke")
		fs.StringVar(&o.req.JTI, "jti", "", "a jti to revoke (with --issuer)")
		fs.StringVar(&o.req.Sub, "sub", "", "a subject whose tokens issued until now are revoked (with --issuer)")
		fs.StringVar(&o.req.Issuer, "issuer", "", "issuer name, as in the config")
		fs.StringVar(&o.req.TTL, "ttl", "", "how long the revocation is kept (default: the server's revocation_ttl)")
		if code, ok := parseFlags(fs, args); !ok {
			return code
		}
		return revoke(o, stdout, stderr)
	case "version", "--version":
		if code, ok := parseFlags(fs, args); !ok {
			return code
		}
		fmt.Fprintln(stdout, version())
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage())
		return 0
	}
	names := make([]string, len(commands))
	for i, c := range commands {
		names[i] = c.name
	}
	fmt.Fprintf(stderr, "unknown command %q", cmd)
	if n := nearest(cmd, names); n != "" {
		fmt.Fprintf(stderr, " (did you mean %s?)", n)
	}
	fmt.Fprintf(stderr, "\n\n%s", usage())
	return 2
}

// parseFlags parses a command's flags: --help prints them and exits 0, a
// bad flag exits 2, and so do stray arguments (a flag after them would be
// ignored silently).
func parseFlags(fs *flag.FlagSet, args []string) (int, bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, false
		}
		return 2, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected argument %q (flags are --name value)\n", fs.Name(), fs.Arg(0))
		return 2, false
	}
	return 0, true
}

func serve(path, grpcAddr, httpAddr string, stdout, stderr io.Writer) int {
	cfg, grpcLis, httpLis, err := loadAndListen(path, grpcAddr, httpAddr)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	log := newLogger(cfg.Server.LogFormat, cfg.Server.LogLevel)
	if path == "" {
		log.Warn("running on the embedded DEMO config: it trusts a published demo key; never use it in production")
	}
	if path == "" {
		demoHint(stdout, grpcLis.Addr().String())
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	var opts []runOption
	if path != "" {
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		opts = append(opts, withReload(path, hup))
	}
	if err := run(ctx, cfg, grpcLis, httpLis, log, opts...); err != nil {
		log.Error("exiting", "error", err)
		return 1
	}
	return 0
}

// loadAndListen loads the config at path ("" for the demo config) and
// opens its listeners, with the command line's addresses over its own.
func loadAndListen(path, grpcAddr, httpAddr string) (*fileConfig, net.Listener, net.Listener, error) {
	cfg, err := loadConfig(path)
	if err != nil {
		return nil, nil, nil, err
	}
	grpcLis, httpLis, err := listenOn(cfg, grpcAddr, httpAddr)
	return cfg, grpcLis, httpLis, err
}

// listenOn applies the command line's listen addresses over the config's
// and opens both listeners (httpLis nil when http_addr is off).
func listenOn(cfg *fileConfig, grpcAddr, httpAddr string) (grpcLis, httpLis net.Listener, err error) {
	if grpcAddr != "" {
		cfg.Server.GRPCAddr = grpcAddr
	}
	if httpAddr != "" {
		cfg.Server.HTTPAddr = httpAddr
	}
	if p := cfg.Server.validateAddrs(); len(p) > 0 {
		return nil, nil, errors.New(strings.Join(p, "\n"))
	}
	if grpcLis, err = listen(cfg.Server.GRPCAddr); err != nil {
		return nil, nil, errors.New(listenError("server.grpc_addr", "--grpc-addr", cfg.Server.GRPCAddr, err))
	}
	if cfg.Server.HTTPAddr != "off" {
		if httpLis, err = net.Listen("tcp", cfg.Server.HTTPAddr); err != nil {
			_ = grpcLis.Close()
			return nil, nil, errors.New(listenError("server.http_addr", "--http-addr", cfg.Server.HTTPAddr, err))
		}
	}
	return grpcLis, httpLis, nil
}

// listenError says what to do when an address cannot be had.
func listenError(key, flagName, addr string, err error) string {
	msg := fmt.Sprintf("cannot listen on %s (%s): %v", addr, key, err)
	if errors.Is(err, syscall.EADDRINUSE) {
		msg += fmt.Sprintf("\nthe port is taken (another tokenauthz?): stop that process, or choose another address with %s HOST:PORT"+
			" (or set %s in the config; 127.0.0.1:0 picks a free port)", flagName, key)
	}
	return msg
}

// demoHint prints, on the demo config, a demo token and a grpcurl line
// that gets the first allow.
func demoHint(w io.Writer, grpcAddr string) {
	tok, err := demoToken("alice", "read", "alice@example.com", time.Hour, "")
	if err != nil {
		return
	}
	fmt.Fprintf(w, `
tokenauthz is running on the DEMO config (never deploy it). Check is on %[1]s.
A demo token (sub alice, scope read, valid 1h):

  %[2]s

The first allow, from another shell (go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4):

  grpcurl -plaintext -d '{"attributes":{"request":{"http":{"method":"GET","path":"/orders/1","host":"api.example.com","headers":{"authorization":"Bearer %[2]s"}}}}}' %[1]s envoy.service.auth.v3.Authorization/Check

`, grpcAddr, tok)
}

// demoToken signs a token with the demo key for the demo config's issuer and
// first audience.
func demoToken(sub, scope, email string, ttl time.Duration, bindKey string) (string, error) {
	cfg, err := parseConfig(deploy.DemoConfig, "demo config")
	if err != nil {
		return "", err
	}
	is := cfg.Issuers[0]
	key, err := jwk.ParseKey(deploy.DemoSigningKey)
	if err != nil {
		return "", fmt.Errorf("demo key: %w", err)
	}
	now := time.Now()
	b := jwt.NewBuilder().Issuer(is.Issuer).Audience(is.Audiences[:1]).Subject(sub).
		IssuedAt(now).NotBefore(now).Expiration(now.Add(ttl))
	if scope != "" {
		b = b.Claim("scope", scope)
	}
	if email != "" {
		b = b.Claim("email", email)
	}
	if bindKey != "" {
		k, err := loadOrMakeProofKey(bindKey)
		if err != nil {
			return "", err
		}
		jkt, err := thumbprint(k)
		if err != nil {
			return "", err
		}
		b = b.Claim("cnf", map[string]any{"jkt": jkt})
	}
	t, err := b.Build()
	if err != nil {
		return "", err
	}
	signed, err := jwt.Sign(t, jwt.WithKey(jwa.ES256, key))
	if err != nil {
		return "", err
	}
	return string(signed), nil
}

// buildVersion is set at build time (-ldflags "-X main.buildVersion=v1.2.3"),
// as the Dockerfile does.
var buildVersion string

func version() string {
	v := buildVersion
	if bi, ok := debug.ReadBuildInfo(); v == "" && ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		v = bi.Main.Version
	}
	if v == "" {
		v = "devel"
	}
	return "tokenauthz " + v
}

// flagNames puts the CLI's flags for the admin API's field names in its
// error messages.
var flagNames = strings.NewReplacer("token_sha256", "--token-sha256", "issuer:", "--issuer:", "ttl:", "--ttl:")

type revokeOptions struct {
	admin, adminTokenFile, token string
	req                          revokeRequest
}

func revoke(o revokeOptions, stdout, stderr io.Writer) int {
	tok, err := cache.ReadSecret(o.adminTokenFile, "TOKENAUTHZ_ADMIN_TOKEN")
	if err != nil || tok == nil {
		fmt.Fprintln(stderr, "revoke: an admin token is needed (--admin-token-file or $TOKENAUTHZ_ADMIN_TOKEN):", err)
		return 2
	}
	set := 0
	for _, v := range []string{o.token, o.req.TokenSHA256, o.req.JTI, o.req.Sub} {
		if v != "" {
			set++
		}
	}
	switch {
	case set != 1:
		fmt.Fprintln(stderr, "revoke: give exactly one of --token, --token-sha256, --jti, --sub")
		return 2
	case (o.req.JTI != "" || o.req.Sub != "") && o.req.Issuer == "":
		fmt.Fprintln(stderr, "revoke: --jti and --sub need --issuer (the issuer's name in the config)")
		return 2
	case o.req.Issuer != "" && o.req.JTI == "" && o.req.Sub == "":
		fmt.Fprintln(stderr, "revoke: --issuer goes with --jti or --sub")
		return 2
	}
	if o.token != "" {
		o.req.TokenSHA256 = cache.Hash(strings.TrimPrefix(o.token, "Bearer "))
	}
	admin := o.admin
	if !strings.Contains(admin, "://") {
		admin = "http://" + admin // host:port, as --admin is usually given
	}
	body, _ := json.Marshal(o.req)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(admin, "/")+"/admin/revoke", bytes.NewReader(body))
	if err != nil {
		fmt.Fprintln(stderr, "revoke:", err)
		return 2
	}
	req.Header.Set("Authorization", "Bearer "+string(tok))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintln(stderr, "revoke:", err)
		return 1
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		msg := strings.TrimSpace(string(out))
		if json.Unmarshal(out, &e) == nil && e.Error != "" {
			msg = flagNames.Replace(e.Error)
		}
		fmt.Fprintf(stderr, "revoke: HTTP %d from %s: %s\n", resp.StatusCode, admin, msg)
		return 1
	}
	fmt.Fprintf(stdout, "%s", out)
	return 0
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// placeholder names a flag's argument in usage.
func placeholder(name, typ string) string {
	switch {
	case name == "f" || name == "config" || strings.HasSuffix(name, "-file") || name == "key" || name == "bind-key":
		return "FILE"
	case strings.HasSuffix(name, "-addr"):
		return "ADDR"
	case name == "url" || name == "admin":
		return "URL"
	case name == "ttl":
		return "DURATION"
	case name == "header":
		return "NAME=VALUE"
	case typ == "string" || typ == "value":
		return strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
	}
	return typ
}

// durationFlag is a duration flag whose error says what a duration is.
type durationFlag struct{ d *time.Duration }

func (f durationFlag) String() string {
	if f.d == nil {
		return ""
	}
	return f.d.String()
}

func (f durationFlag) Set(v string) error {
	d, err := time.ParseDuration(v)
	if err != nil {
		if _, num := strconv.ParseFloat(v, 64); num == nil {
			return fmt.Errorf("durations need a unit, like 30m or 1h")
		}
		return fmt.Errorf("not a duration: a number and a unit (ns, us, ms, s, m, h), like 30m or 1h")
	}
	*f.d = d
	return nil
}
