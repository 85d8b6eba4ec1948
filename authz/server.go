package authz

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.opentelemetry.io/otel/trace"

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

// Check decides one request. It never returns a gRPC error: denials are
// responses, and so is a recovered panic (denied with 500).
func (s *Server) Check(ctx context.Context, req *authv3.CheckRequest) (resp *authv3.CheckResponse, err error) {
	start := time.Now()
	st := s.state.Load()
	h := req.GetAttributes().GetRequest().GetHttp()
	ctx, span := s.obs.startSpan(ctx, h)
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
		s.report(ctx, span, d, token, time.Since(start))
	}()
	d, token = s.decide(ctx, st, req, nil)
	return d.response(st.pol, h.GetHeaders(), h.GetHeaderMap().GetHeaders()), nil
}

// Explain decides req as Check would and returns, besides the response,
// every step's reason: which route matched and why, the token's issuer,
// which check failed. It is how an operator answers "why was this denied?".
func (s *Server) Explain(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, []string) {
	st := s.state.Load()
	h := req.GetAttributes().GetRequest().GetHttp()
	tr := &trail{}
	d, _ := s.decide(ctx, st, req, tr)
	return d.response(st.pol, h.GetHeaders(), h.GetHeaderMap().GetHeaders()), tr.steps
}

// trail collects the steps of a decision for Explain. Every Check passes a
// nil trail, and call sites test for nil first: boxing the arguments of a
// variadic call allocates even when it would record nothing.
type trail struct{ steps []string }

func (t *trail) add(format string, args ...any) {
	if t != nil {
		t.steps = append(t.steps, fmt.Sprintf(format, args...))
	}
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

func (s *Server) decide(ctx context.Context, st *state, req *authv3.CheckRequest, tr *trail) (*decision, string) {
	p := st.pol
	h := req.GetAttributes().GetRequest().GetHttp()
	rq, d := canonicalRequest(h)
	if d != nil {
		if tr != nil {
			tr.add("request refused before route matching: %s (it has no single meaning across upstreams)", d.desc)
		}
		return d, ""
	}
	var r *route
	if name, named := req.GetAttributes().GetContextExtensions()["route"]; named {
		if r = p.byName[name]; r == nil {
			s.log.Error("context_extensions names an unknown route; check the Envoy route config", "route", name)
			if tr != nil {
				tr.add("context_extensions names route %q, which the config does not have", name)
			}
			return denyNoRoute("unknown_route", "no policy for this route"), ""
		}
		if tr != nil {
			tr.add("route %q, named by Envoy's context_extensions", name)
		}
	} else {
		var ambiguous bool
		if r, ambiguous = p.match(&rq); ambiguous {
			if tr != nil {
				tr.add("%s %s on host %q: exact and case-insensitive matching choose different routes", rq.method, rq.path, rq.host)
			}
			return denyRequest("ambiguous_case", "the path's letter case selects a different policy than its lower-case form"), ""
		}
		if r == nil {
			if tr != nil {
				tr.add("no route matches %s %s on host %q", rq.method, rq.path, rq.host)
			}
			return denyNoRoute("no_route", "no route matches the request"), ""
		}
		if tr != nil {
			tr.add("route %q: the first whose match fits %s %s on host %q", r.name, rq.method, rq.path, rq.host)
		}
	}
	if r.anonymous {
		if tr != nil {
			tr.add("route %q is anonymous: no token looked at (claim and Authorization headers are stripped)", r.name)
		}
		return &decision{allow: true, reason: "anonymous", route: r}, ""
	}

	token, d := credentials(h, rq.query, p.maxTokenBytes)
	if d != nil && d.reason == "missing_token" && r.allowMissing {
		if tr != nil {
			tr.add("no bearer token, and route %q allows a missing one: allowed with no identity (claim and Authorization headers stripped)", r.name)
		}
		return &decision{allow: true, reason: "no_token", route: r}, ""
	}
	if d != nil {
		if tr != nil {
			tr.add("credentials: %s", d.desc)
		}
		d.route = r
		return d, token
	}
	if tr != nil {
		tr.add("bearer token: %d bytes, %s, sha256 prefix %s", len(token), verify.Describe(token), TokenHash(token))
		tr.add("issuers accepted on route %q: %s", r.name, strings.Join(r.vpol.Issuers, ", "))
	}
	vp := r.vpol
	vp.Client = clientAddress(req, p.clientHeader)
	res, err := st.v.Verify(ctx, token, vp)
	if err != nil {
		ve := verify.AsError(err)
		var d *decision
		if ve.Kind == verify.Invalid {
			d = denyInvalid(ve.Reason, ve.Desc)
			if tr != nil {
				tr.add("token refused (%s): %s", ve.Reason, ve.Desc)
			}
		} else if ve.Reason == verify.ReasonThrottled {
			// Expected under a flood: counted (decision and provider
			// metrics), not logged one by one.
			d = errUnavailable("authorization is temporarily unavailable")
			d.reason, d.quiet = verify.ReasonThrottled, true
			if tr != nil {
				tr.add("no decision possible: %v", err)
			}
		} else {
			// The cause names the issuer and endpoint, never the token.
			s.log.Warn("no decision possible", "route", r.name, "issuer", ve.Issuer, "error", err.Error())
			d = errUnavailable("authorization is temporarily unavailable")
			if tr != nil {
				tr.add("no decision possible: %v", err)
			}
		}
		d.route = r
		return d, token
	}
	if tr != nil {
		tr.add("token verified: issuer %q, %s, keys from %s%s", res.Issuer.Name(), res.Kind, orDash(res.KeySource), answerNote(res))
	}
	if s.denylist != nil {
		iat, _ := res.Claims.Time("iat")
		kind, revoked := s.denylist.Revoked(cache.Token{
			TokenHash: func() string { return cache.Hash(token) },
			Issuer:    res.Issuer.ID(), JTI: res.Claims.String("jti"), Sub: res.Claims.String("sub"), IAT: iat,
		})
		if revoked {
			if tr != nil {
				tr.add("revoked by %s", kind)
			}
			d := denyInvalid("revoked_"+kind, "token has been revoked")
			d.route, d.result = r, res
			return d, token
		}
	}
	if missing := r.missingScopes(res.Claims); len(missing) > 0 {
		if tr != nil {
			tr.add("scopes: route needs %q, token has %q: missing %q", r.scopes, res.Claims.Scopes(), missing)
		}
		d := denyForbidden("insufficient_scope", "the token lacks a required scope", strings.Join(r.scopes, " "))
		d.route, d.result = r, res
		return d, token
	} else if len(r.scopes) > 0 {
		if tr != nil {
			tr.add("scopes: route needs %q: all present", r.scopes)
		}
	}
	for i := range r.claims {
		rule := &r.claims[i]
		v, found := res.Lookup(rule.claim)
		if !found || !rule.satisfied(v) {
			if tr != nil {
				got := "absent"
				if found {
					got, _ = verify.FormatClaim(v)
					got = fmt.Sprintf("%q (%T)", got, v)
				}
				tr.add("claim %s: is %s, accepted: %s", rule.claim, got, rule.describe())
			}
			d := denyForbidden("claim_mismatch", "claim "+rule.claim+" does not have an accepted value", "")
			d.route, d.result = r, res
			return d, token
		}
		if tr != nil {
			tr.add("claim %s: accepted value", rule.claim)
		}
	}
	return &decision{allow: true, reason: "ok", route: r, result: res}, token
}

// report ends the decision's span, counts it and logs it: every deny, and
// the configured fraction of allows.
func (s *Server) report(ctx context.Context, span trace.Span, d *decision, token string, took time.Duration) {
	info := d.info(took)
	s.obs.endSpan(span, d, info)
	s.obs.Observer.Decision(info)
	if d.quiet || d.allow && (s.obs.AllowLogRate <= 0 || rand.Float64() >= s.obs.AllowLogRate) {
		return
	}
	attrs := []slog.Attr{slog.String("reason", d.reason), slog.Int("status", int(d.httpStatus))}
	if d.allow {
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
	}
	if token != "" {
		attrs = append(attrs, slog.String("token_hash", TokenHash(token)))
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, info.Decision, attrs...)
}

// TokenHash is a short SHA-256 digest of a token, for logs: enough to
// correlate, never the token.
func TokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:8])
}
