package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// The memory workload: RSS must stay flat (±10%) from 100,000 to 2,000,000
// distinct tokens seen, since the verified-token cache is bounded by bytes.
// Tokens are HS256 (minted here as fast as they are sent, where RSA signing
// would take longer than the run) and each is checked twice, as a client
// reusing its token would: the cache keeps a token from its second
// verification, so every token passes through it. A file of 2,000,000
// requests for ghz would be a gigabyte; this workload has its own client.
const memorySecret = "loadbench-hs256-secret-0123456789abcdef"

type memoryResult struct {
	tokens []int     // checkpoints: distinct tokens seen
	rss    []float64 // the server's RSS (MiB) at each
	heap   []float64 // its heap in use (MiB, go_memstats_heap_inuse_bytes) at each
	rate   float64   // checks a second over the whole run
}

// memoryRun starts tokenauthz with an HS256 issuer and checks never-seen
// tokens until each checkpoint, reading the server's RSS at each.
func memoryRun(dir string, checkpoints []int) (*memoryResult, error) {
	cfg := filepath.Join(dir, "config-memory.yaml")
	if err := os.WriteFile(cfg, []byte(`server: { grpc_addr: "127.0.0.1:0", http_addr: "127.0.0.1:0" }
issuers:
  - { name: hs, issuer: "https://hs.example", audiences: [api], algorithms: [HS256], hmac_secret_env: LOADBENCH_HMAC_SECRET }
routes:
  - { name: api, match: { path_prefix: / }, scopes: [read] }
headers: { x-user-id: sub, x-user-scopes: scope }
`), 0o600); err != nil {
		return nil, err
	}
	s, err := start(dir, "tokenauthz", cfg, []string{"OTEL_TRACES_EXPORTER=none", "LOADBENCH_HMAC_SECRET=" + memorySecret})
	if err != nil {
		return nil, err
	}
	defer s.stop()
	// Two connections, as the ghz runs.
	var conns [2]authv3.AuthorizationClient
	for i := range conns {
		cc, err := grpc.NewClient(s.grpc, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, err
		}
		defer cc.Close()
		conns[i] = authv3.NewAuthorizationClient(cc)
	}
	var (
		next   atomic.Int64
		denied atomic.Int64
		failed atomic.Value
	)
	exp := time.Now().Add(2 * time.Hour).Unix()
	hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`))
	check := func(c authv3.AuthorizationClient, tok string) {
		req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
			Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/api/orders/1", Host: "api.example.com",
				Scheme: "https", Protocol: "HTTP/2", Headers: map[string]string{":method": "GET", ":path": "/api/orders/1",
					":authority": "api.example.com", "authorization": "Bearer " + tok, "user-agent": "curl/8.5.0"}}},
			Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{}}}}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := c.Check(ctx, req)
		switch {
		case err != nil:
			failed.CompareAndSwap(nil, err)
		case resp.GetStatus().GetCode() != 0:
			denied.Add(1)
		}
	}
	r := &memoryResult{}
	start := time.Now()
	for _, upto := range checkpoints {
		var wg sync.WaitGroup
		for w := range *concurrency {
			wg.Go(func() {
				mac := hmac.New(sha256.New, []byte(memorySecret))
				c := conns[w%len(conns)]
				for {
					i := next.Add(1) - 1
					if i >= int64(upto) || failed.Load() != nil {
						return
					}
					payload := base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil,
						`{"iss":"https://hs.example","aud":"api","sub":"user-%d","scope":"read write","exp":%d}`, i, exp))
					mac.Reset()
					mac.Write([]byte(hdr + "." + payload))
					tok := hdr + "." + payload + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
					check(c, tok)
					check(c, tok)
				}
			})
		}
		wg.Wait()
		next.Store(int64(upto))
		if err, _ := failed.Load().(error); err != nil {
			return nil, fmt.Errorf("memory workload: %w", err)
		}
		if n := denied.Load(); n > 0 {
			return nil, fmt.Errorf("memory workload: %d checks denied", n)
		}
		r.tokens = append(r.tokens, upto)
		r.rss = append(r.rss, rss(s.cmd.Process.Pid))
		r.heap = append(r.heap, s.gauge("go_memstats_heap_inuse_bytes")/(1<<20))
		step(fmt.Sprintf("memory: %d tokens, RSS %.1f MiB", upto, r.rss[len(r.rss)-1]))
	}
	r.rate = float64(2*checkpoints[len(checkpoints)-1]) / time.Since(start).Seconds()
	return r, nil
}

// gauge reads one unlabelled series from the server's /metrics.
func (s *server) gauge(name string) float64 {
	return s.series(func(l string) bool { return strings.HasPrefix(l, name+" ") })
}

func (m *memoryResult) report(w io.Writer) {
	fmt.Fprintf(w, "\nmemory: never-seen HS256 tokens, each checked twice (%.0f checks/s)\n", m.rate)
	fmt.Fprintf(w, "%12s %10s %14s\n", "tokens seen", "RSS MiB", "heap in use MiB")
	for i := range m.tokens {
		fmt.Fprintf(w, "%12s %10.1f %14.1f\n", strconv.Itoa(m.tokens[i]), m.rss[i], m.heap[i])
	}
	first, last := m.rss[0], m.rss[len(m.rss)-1]
	verdict := "met"
	if ratio := last / first; ratio > 1.1 || ratio < 0.9 {
		verdict = "MISSED"
	}
	fmt.Fprintf(w, "\n%-70s %6.2fx (target 0.90x..1.10x) %s\n",
		fmt.Sprintf("memory: RSS at %d tokens seen over at %d", m.tokens[len(m.tokens)-1], m.tokens[0]), last/first, verdict)
}
