package authz

import (
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/verify"
)

// TokenVerifier checks a raw token against what a route asks of it. Errors
// are *verify.Error; any other error is treated as Unavailable.
type TokenVerifier interface {
	Verify(ctx context.Context, raw string, p verify.Policy) (*verify.Result, error)
}

// Server implements envoy.service.auth.v3.Authorization. It is safe for
// concurrent use; Swap replaces its policy atomically.
type Server struct {
	authv3.UnimplementedAuthorizationServer
	state    atomic.Pointer[state]
	log      *slog.Logger
	denylist Denylist
	obs      Observability
}

// Denylist answers whether a verified token has been revoked (by token,
// jti or subject) before its exp.
type Denylist interface {
	Revoked(cache.Token) (kind string, revoked bool)
}

// UseDenylist makes every allow consult d. Call it before serving.
func (s *Server) UseDenylist(d Denylist) { s.denylist = d }

type state struct {
	pol *policy
	v   TokenVerifier
}

// NewServer compiles cfg and serves decisions with v.
func NewServer(cfg *Config, v TokenVerifier, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{log: log}
	s.Observe(Observability{})
	if err := s.Swap(cfg, v); err != nil {
		return nil, err
	}
	return s, nil
}

// Swap installs a new policy and verifier. Checks in flight finish on the
// ones they started with; none sees a mix.
func (s *Server) Swap(cfg *Config, v TokenVerifier) error {
	pol, err := compile(cfg)
	if err != nil {
		return err
	}
	if v == nil {
		return errors.New("authz: nil verifier")
	}
	s.state.Store(&state{pol: pol, v: v})
	return nil
}

// Check decides one request. It returns no gRPC error (denials are
// responses, and so is a recovered panic, denied with 500) unless the
// config asks for undecidable checks as UNAVAILABLE statuses.
func (s *Server) Check(ctx context.Context, req *authv3.CheckRequest) (resp *authv3.CheckResponse, err error) {
	start := time.Now()
	st := s.state.Load()
	h := req.GetAttributes().GetRequest().GetHttp()
	ctx, span, linked := s.obs.startSpan(ctx, h)
	var (
		d     *decision
		token string
	)
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("check panicked", "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			d = errInternal()
			resp, err = d.response(st.pol, nil, nil), nil
		}
		s.report(ctx, span, linked, h, d, token, time.Since(start))
	}()
	d, token = s.decide(ctx, st, req, nil)
	if d.code == codes.Unavailable && st.pol.grpcErrors {
		// undecidable_response: grpc_unavailable, for Envoys before 1.37:
		// a gRPC error is what makes them apply status_on_error and
		// failure_mode_allow.
		return nil, status.Error(codes.Unavailable, safeText(d.desc, maxDescBytes))
	}
	return d.response(st.pol, h.GetHeaders(), h.GetHeaderMap().GetHeaders()), nil
}

// Explain decides req as Check would and returns, besides the response,
// every step's reason: which route matched and why, the token's issuer,
// which check failed. It is how an operator answers "why was this denied?".
func (s *Server) Explain(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, []string) {
	resp, e := s.ExplainDecision(ctx, req)
	return resp, e.Steps
}

// Explanation is what one decision went through: its steps (as Explain
// renders them), the route, the reason, and every `when` condition
// evaluated with its outcome. Policy tests read it (tokenauthz test).
type Explanation struct {
	Steps  []string
	Route  string // "" when no route was chosen
	Reason string // ok, when_false, insufficient_scope, expired, …
	DryRun bool
	When   []WhenResult
}

// WhenResult is one evaluated `when` condition of a route.
type WhenResult struct {
	Route  string
	Index  int
	Expr   string
	Result bool
	Err    error
}

// ExplainDecision decides req as Check would and says how.
func (s *Server) ExplainDecision(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, *Explanation) {
	st := s.state.Load()
	h := req.GetAttributes().GetRequest().GetHttp()
	tr := &trail{}
	d, _ := s.decide(ctx, st, req, tr)
	info := d.info(0)
	return d.response(st.pol, h.GetHeaders(), h.GetHeaderMap().GetHeaders()),
		&Explanation{Steps: tr.steps, Route: info.Route, Reason: info.Reason, DryRun: info.DryRun, When: tr.whens}
}

func orDash(src cache.Source) string {
	if src == "" {
		return "-"
	}
	return string(src)
}

func answerNote(r *verify.Result) string {
	if r.AnswerSource == "" {
		return ""
	}
	return ", introspection answer from " + string(r.AnswerSource)
}

// report ends the decision's span, counts it and logs it: every deny, and
// the configured fraction of allows.
func (s *Server) report(ctx context.Context, span trace.Span, linked trace.SpanContext, h *authv3.AttributeContext_HttpRequest,
	d *decision, token string, took time.Duration) {
	info := d.info(took)
	info.Transport = transportOf(ctx)
	s.obs.endSpan(span, d, info)
	allowed := d.allow && d.wouldBe == nil // a dry-run's would-be deny is logged as a deny
	logLine := !d.quiet && !(allowed && (s.obs.AllowLogRate <= 0 || rand.Float64() >= s.obs.AllowLogRate))
	if s.obs.untraced && (d.event != nil || logLine) && !span.SpanContext().IsValid() {
		ctx = callTrace(ctx, s.obs.Propagator) // read only now that something names it
		span = trace.SpanFromContext(ctx)
	}
	s.obs.Observer.Decision(info)
	if ev := d.event; ev != nil {
		ev.ID = newDecisionID()
		ev.Time = time.Now().UTC()
		if sc := span.SpanContext(); sc.HasTraceID() {
			ev.TraceID, ev.SpanID = sc.TraceID().String(), sc.SpanID().String()
		}
		ev.Transport, ev.Route, ev.Issuer, ev.Decision, ev.Reason = info.Transport, info.Route, info.Issuer, info.Decision, info.Reason
		ev.DryRun, ev.LatencyMS = info.DryRun, float64(took.Microseconds())/1000
		ev.Status = d.status()
		if d.wouldBe != nil {
			ev.Status = d.wouldBe.status()
		}
		s.obs.DecisionLog.Log(*ev)
	}
	if !logLine {
		return
	}
	attrs := []slog.Attr{slog.String("reason", info.Reason), slog.Int("status", int(d.httpStatus)), slog.String("transport", info.Transport)}
	switch {
	case d.wouldBe != nil:
		attrs[1] = slog.Int("status", int(d.wouldBe.httpStatus))
		attrs = append(attrs, slog.Bool("dry_run", true), slog.String("enforced", "allow"))
	case d.allow:
		attrs[1] = slog.Int("status", 200)
	}
	if info.Route != "" {
		attrs = append(attrs, slog.String("route", info.Route))
	}
	if info.Issuer != "" {
		attrs = append(attrs, slog.String("issuer", info.Issuer))
	}
	if sc := span.SpanContext(); sc.HasTraceID() {
		attrs = append(attrs, slog.String("trace_id", sc.TraceID().String()))
	} else if s.obs.untraced {
		linked = s.obs.requestTrace(h) // read only now: most checks log nothing
	}
	if linked.IsValid() {
		attrs = append(attrs, slog.String("request_trace_id", linked.TraceID().String()))
	}
	if token != "" {
		attrs = append(attrs, slog.String("token_hash", TokenHash(token)))
	}
	if d.detail != "" {
		attrs = append(attrs, slog.String("detail", d.detail))
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, info.Decision, attrs...)
}

// newDecisionID is a random 128-bit id, hex.
func newDecisionID() string {
	var b [16]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// TokenHash is a short SHA-256 digest of a token, for logs: enough to
// correlate, never the token.
func TokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:8])
}
