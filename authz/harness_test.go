package authz_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
)

// clock is a settable time source shared by the verifier under test.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock               { return &clock{now: time.Now().Truncate(time.Second)} }
func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }
func (c *clock) Unix() int64         { return c.Now().Unix() }

// startWith serves Check for cfg with v on a loopback port and returns the
// generated ext_authz client.
func startWith(t *testing.T, cfg *authz.Config, v authz.TokenVerifier) authv3.AuthorizationClient {
	t.Helper()
	srv, err := authz.NewServer(cfg, v, nil)
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, srv)
}

// serve runs srv on a real gRPC server on a loopback port until the test
// ends and returns the generated ext_authz client for it.
func serve(t *testing.T, srv *authz.Server, opts ...grpc.ServerOption) authv3.AuthorizationClient {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(opts...)
	authv3.RegisterAuthorizationServer(gs, srv)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return authv3.NewAuthorizationClient(conn)
}

// start builds a real verifier for cfg.Issuers on clk and serves it.
func start(t *testing.T, cfg *authz.Config, clk *clock) authv3.AuthorizationClient {
	t.Helper()
	o := verify.Options{}
	if clk != nil {
		o.Now = clk.Now
	}
	v, err := verify.New(cfg.Issuers, o)
	if err != nil {
		t.Fatal(err)
	}
	return startWith(t, cfg, v)
}

type req struct {
	method, host, path string
	headers            map[string]string
	ext                map[string]string
	raw                []*corev3.HeaderValue // encode_raw_headers form
	source             string                // the client's address, as Envoy's attributes.source
	cert               string                // the client certificate (URL-encoded PEM), as include_peer_certificate sends it
}

func (r req) proto() *authv3.CheckRequest {
	if r.method == "" {
		r.method = "GET"
	}
	if r.host == "" {
		r.host = "api.example.com"
	}
	if r.path == "" {
		r.path = "/orders/1"
	}
	h := map[string]string{":method": r.method, ":authority": r.host, ":path": r.path}
	for k, v := range r.headers {
		h[k] = v
	}
	if r.raw != nil {
		h = nil
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: "42", Method: r.method, Host: r.host, Path: r.path, Scheme: "https", Protocol: "HTTP/2",
			Headers: h, HeaderMap: headerMap(r.raw),
		}},
		ContextExtensions: r.ext,
		Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: r.source, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 40000}}}},
			Certificate: r.cert},
	}}
}

func headerMap(hs []*corev3.HeaderValue) *corev3.HeaderMap {
	if hs == nil {
		return nil
	}
	return &corev3.HeaderMap{Headers: hs}
}

func bearer(tok string) map[string]string { return map[string]string{"authorization": "Bearer " + tok} }

func check(t *testing.T, c authv3.AuthorizationClient, r req) *authv3.CheckResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := c.Check(ctx, r.proto())
	if err != nil {
		t.Fatalf("Check returned a gRPC error (a deny must be a response): %v", err)
	}
	return resp
}

// allowed asserts an allow and returns the headers it sets and removes.
func allowed(t *testing.T, resp *authv3.CheckResponse) (set map[string]string, removed []string) {
	t.Helper()
	if codes.Code(resp.GetStatus().GetCode()) != codes.OK {
		t.Fatalf("want allow, got status %d %q, www-authenticate %q", resp.GetStatus().GetCode(),
			resp.GetStatus().GetMessage(), wwwAuth(resp))
	}
	ok := resp.GetOkResponse()
	if ok == nil {
		t.Fatal("allow without ok_response")
	}
	set = map[string]string{}
	for _, h := range ok.GetHeaders() {
		if h.GetAppend() == nil || h.GetAppend().GetValue() || h.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
			t.Errorf("header %s is not set with overwrite semantics: %v", h.GetHeader().GetKey(), h)
		}
		set[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	return set, ok.GetHeadersToRemove()
}

// denied asserts a denial with httpStatus and gRPC code, and that the
// WWW-Authenticate header contains each of want.
func denied(t *testing.T, resp *authv3.CheckResponse, code codes.Code, httpStatus typev3.StatusCode, want ...string) {
	t.Helper()
	if got := codes.Code(resp.GetStatus().GetCode()); got != code {
		t.Fatalf("want status %v, got %v (%q)", code, got, resp.GetStatus().GetMessage())
	}
	d := resp.GetDeniedResponse()
	if code == codes.Unavailable {
		d = resp.GetErrorResponse()
	}
	if d == nil {
		t.Fatalf("no denied/error response in %v", resp)
	}
	if d.GetStatus().GetCode() != httpStatus {
		t.Fatalf("want HTTP %v, got %v", httpStatus, d.GetStatus().GetCode())
	}
	wa := wwwAuth(resp)
	for _, w := range want {
		if !strings.Contains(wa, w) {
			t.Errorf("WWW-Authenticate %q lacks %q", wa, w)
		}
	}
}

func wwwAuth(resp *authv3.CheckResponse) string {
	d := resp.GetDeniedResponse()
	if d == nil {
		d = resp.GetErrorResponse()
	}
	for _, h := range d.GetHeaders() {
		if h.GetHeader().GetKey() == "www-authenticate" {
			return h.GetHeader().GetValue()
		}
	}
	return ""
}

func contains(list []string, s string) bool {
	for _, e := range list {
		if e == s {
			return true
		}
	}
	return false
}
