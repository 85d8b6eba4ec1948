package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strings"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
)

// headerFlags collects repeated --header k=v flags.
type headerFlags map[string]string

func (h headerFlags) String() string { return fmt.Sprint(map[string]string(h)) }
func (h headerFlags) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("want name=value")
	}
	h[strings.ToLower(k)] = val
	return nil
}

type checkOptions struct {
	config, token, tokenFile, method, host, path, route string
	headers                                             headerFlags
}

// explain evaluates one request offline against a config, fetching keys
// (and calling introspection) as the service would, and prints every step
// and the decision. Exit 0 for an allow, 1 for a deny or an error.
func explain(o checkOptions, stdout, stderr io.Writer) int {
	cfg, err := loadConfig(o.config)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	tok := o.token
	if o.token != "" && o.tokenFile != "" {
		fmt.Fprintln(stderr, "check: give --token or --token-file, not both")
		return 2
	}
	if o.tokenFile != "" {
		b, err := os.ReadFile(o.tokenFile)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 2
		}
		tok = strings.TrimSpace(string(b))
	}
	v, err := verify.New(cfg.Issuers, verify.Options{CacheMaxBytes: cfg.Cache.MaxBytes})
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	srv, err := authz.NewServer(&cfg.Config, v, slog.New(slog.DiscardHandler))
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	hdrs := map[string]string{":method": o.method, ":path": o.path, ":authority": o.host}
	for k, val := range o.headers {
		hdrs[k] = val
	}
	if tok != "" {
		hdrs["authorization"] = "Bearer " + strings.TrimPrefix(tok, "Bearer ")
	}
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: o.method, Path: o.path, Host: o.host, Headers: hdrs}}}}
	if o.route != "" {
		req.Attributes.ContextExtensions = map[string]string{"route": o.route}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, steps := srv.Explain(ctx, req)

	fmt.Fprintf(stdout, "request: %s %s (host %q)\n", o.method, o.path, o.host)
	for i, s := range steps {
		fmt.Fprintf(stdout, "  %d. %s\n", i+1, s)
	}
	code := codes.Code(resp.GetStatus().GetCode())
	if ok := resp.GetOkResponse(); code == codes.OK {
		fmt.Fprintln(stdout, "decision: ALLOW")
		for _, h := range ok.GetHeaders() {
			fmt.Fprintf(stdout, "  set    %s: %s\n", h.GetHeader().GetKey(), h.GetHeader().GetValue())
		}
		removed := append([]string(nil), ok.GetHeadersToRemove()...)
		sort.Strings(removed)
		for _, h := range removed {
			fmt.Fprintf(stdout, "  remove %s\n", h)
		}
		return 0
	}
	d := resp.GetDeniedResponse()
	kind := "DENY"
	if d == nil {
		d, kind = resp.GetErrorResponse(), "ERROR (Envoy applies failure_mode_allow / status_on_error)"
	}
	fmt.Fprintf(stdout, "decision: %s %d (%s): %s\n", kind, d.GetStatus().GetCode(), code, resp.GetStatus().GetMessage())
	for _, h := range d.GetHeaders() {
		if h.GetHeader().GetKey() == "www-authenticate" {
			fmt.Fprintf(stdout, "  www-authenticate: %s\n", h.GetHeader().GetValue())
		}
	}
	return 1
}
