package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// demo runs the service on the demo config, sends it three checks through
// the real gRPC client (an allow, a 403 and a 401) and prints what came
// back: the first allow in one terminal, with nothing to install. It keeps
// serving until interrupted, unless once is set.
func demo(grpcAddr, httpAddr string, once bool, stdout, stderr io.Writer) int {
	cfg, grpcLis, httpLis, err := loadAndListen("", grpcAddr, httpAddr)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	log := slog.New(slog.NewTextHandler(io.Discard, nil)) // the demo's own lines are the output
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg, grpcLis, httpLis, log) }()

	addr := grpcLis.Addr().String()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer conn.Close()
	c := authv3.NewAuthorizationClient(conn)
	tok, err := demoToken("alice", "read", "alice@example.com", time.Hour, "")
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	fmt.Fprintf(stdout, "tokenauthz is serving the DEMO config (never deploy it): Check on %s\n\n", addr)
	for _, tc := range []struct{ what, path, auth string }{
		{"a demo token (scope read) on GET /orders/1", "/orders/1", "Bearer " + tok},
		{"the same token on GET /admin/users (needs scope admin)", "/admin/users", "Bearer " + tok},
		{"no token on GET /orders/1", "/orders/1", ""},
	} {
		h := map[string]string{"x-user-id": "spoofed"}
		if tc.auth != "" {
			h["authorization"] = tc.auth
		}
		req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
			Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: tc.path, Host: "api.example.com", Scheme: "https", Headers: h}}}}
		var resp *authv3.CheckResponse
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			resp, err = c.Check(cctx, req)
			cancel()
			if err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			fmt.Fprintln(stderr, "check:", err)
			return 1
		}
		fmt.Fprintf(stdout, "%s\n  %s\n\n", tc.what, describeResponse(resp))
	}
	fmt.Fprintf(stdout, "Try your own with grpcurl (go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4):\n\n"+
		"  grpcurl -plaintext -d '{\"attributes\":{\"request\":{\"http\":{\"method\":\"GET\",\"path\":\"/orders/1\",\"host\":\"api.example.com\","+
		"\"headers\":{\"authorization\":\"Bearer %s\"}}}}}' %s envoy.service.auth.v3.Authorization/Check\n\n", tok, addr)
	if once {
		stop()
	} else {
		fmt.Fprintln(stdout, "Serving until Ctrl-C.")
	}
	if err := <-done; err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	return 0
}

// describeResponse is one line for a CheckResponse: the decision, the
// status and the headers that matter.
func describeResponse(r *authv3.CheckResponse) string {
	if ok := r.GetOkResponse(); r.GetStatus().GetCode() == 0 && ok != nil {
		s := "ALLOW: headers for the upstream:"
		for _, h := range ok.GetHeaders() {
			s += fmt.Sprintf(" %s=%s", h.GetHeader().GetKey(), h.GetHeader().GetValue())
		}
		return s + fmt.Sprintf("; removed: %v", ok.GetHeadersToRemove())
	}
	d := r.GetDeniedResponse()
	if d == nil {
		d = r.GetErrorResponse()
	}
	s := fmt.Sprintf("DENY %d", d.GetStatus().GetCode())
	for _, h := range d.GetHeaders() {
		if h.GetHeader().GetKey() == "www-authenticate" {
			s += ": WWW-Authenticate: " + h.GetHeader().GetValue()
		}
	}
	return s
}
