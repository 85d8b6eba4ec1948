package authz

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/verify"
)

// check is one request's decision in progress: the canonical request and
// what each step found. Steps read and fill it; the explain observer reads
// it after each step, so the steps carry no explain-only code.
type check struct {
	s      *Server
	pol    *policy
	v      TokenVerifier
	req    *authv3.CheckRequest
	h      *authv3.AttributeContext_HttpRequest
	rq     request
	r      *route
	how    string // how the route was chosen: "named" or "matched"
	tok    string
	scheme string // Bearer or DPoP
	res    *verify.Result
	verr   *verify.Error

	revokedBy string
	bound     verify.Binding // what the token is bound to
	missing   []string       // scopes the token lacks
	claimAt   *claimRule     // the claim rule that failed
	claimVal  any
	claimHas  bool
	when      []whenOutcome
	whenBuf   [4]whenOutcome // when's backing array for the usual few conditions
	vars      celVars
	set       []*corev3.HeaderValueOption
	remove    []string
}

// whenOutcome is one evaluated `when` expression.
type whenOutcome struct {
	rule *whenRule
	ok   bool
	err  error
}

// A step returns nil to go on, or the decision.
type step struct {
	name string
	run  func(context.Context, *check) *decision
}

// steps are the decision, in order. Every request runs them until one
// decides; a request that passes them all is allowed.
var steps = []step{
	{"request", stepRequest},
	{"route", stepRoute},
	{"credentials", stepCredentials},
	{"token", stepToken},
	{"revocation", stepRevocation},
	{"binding", stepBinding},
	{"scopes", stepScopes},
	{"claims", stepClaims},
	{"when", stepWhen},
	{"headers", stepHeaders},
}

// stepObserver sees every step's outcome (Explain); nil for Check.
type stepObserver interface {
	step(name string, c *check, d *decision)
}

// checks recycles check structs: one per request would be the largest
// allocation of a warm check.
var checks = sync.Pool{New: func() any { return new(check) }}

func (s *Server) decide(ctx context.Context, st *state, req *authv3.CheckRequest, obs stepObserver) (*decision, string) {
	c := checks.Get().(*check)
	*c = check{s: s, pol: st.pol, v: st.v, req: req, h: req.GetAttributes().GetRequest().GetHttp()}
	defer func() { *c = check{}; checks.Put(c) }()
	d, tok := c.run(ctx, obs)
	if dl := s.obs.DecisionLog; dl != nil && dl.Sample(d.allow && d.wouldBe == nil) {
		d.event = c.event(d) // the check is recycled: what the event needs is copied now
	}
	return d, tok
}

// event copies what a decision event needs from the check.
func (c *check) event(d *decision) *DecisionEvent {
	ev := &DecisionEvent{Request: EventRequest{Method: c.rq.method, Host: c.rq.host, Path: c.rq.path}, Step: d.step}
	if d.wouldBe != nil {
		ev.Step = d.wouldBe.step
	}
	if res := c.res; res != nil {
		ev.TokenKind, ev.Sub, ev.ClientID = res.Kind, res.Claims.Scalar("sub"), res.Claims.Scalar("client_id")
		ev.Tenant = res.Issuer.Tenant()
	}
	for _, o := range c.when {
		w := WhenOutcome{Expr: o.rule.expr.src, Result: o.ok && o.err == nil}
		if o.err != nil {
			w.Error = o.err.Error()
		}
		ev.When = append(ev.When, w)
	}
	return ev
}

func (c *check) run(ctx context.Context, obs stepObserver) (*decision, string) {
	for i := range steps {
		d := steps[i].run(ctx, c)
		if obs != nil {
			obs.step(steps[i].name, c, d)
		}
		if d != nil {
			d.route, d.result = c.r, c.res
			if c.verr != nil {
				d.issuer = c.verr.Issuer
			}
			if d.allow {
				d.set, d.remove = c.set, c.remove
			} else {
				d.step = steps[i].name
			}
			if c.r != nil && c.r.dryRun && (!d.allow || d.reason != "ok") {
				return c.dryRun(ctx, d), c.tok
			}
			return d, c.tok
		}
	}
	d := &decision{allow: true, reason: "ok", route: c.r, result: c.res, set: c.set, remove: c.remove}
	if c.r != nil && c.r.dryRun {
		d.dryRun = true
	}
	return d, c.tok
}

// dryRun turns a dry-run route's decision into an allow that carries it.
// Claim headers come only from a token that got past verification,
// revocation and binding (a deny later than those); otherwise every claim
// header is removed, as on an anonymous route.
func (c *check) dryRun(ctx context.Context, would *decision) *decision {
	if would.allow { // anonymous or a missing token: nothing to replace
		would.dryRun = true
		return would
	}
	d := &decision{allow: true, reason: "dry_run", route: c.r, dryRun: true, wouldBe: would, issuer: would.issuer}
	switch would.step {
	case "scopes", "claims", "when", "headers":
		d.result = c.res
		if would.step != "headers" && stepHeaders(ctx, c) == nil {
			d.set, d.remove = c.set, c.remove
			return d
		}
	}
	d.set = nil
	d.remove = make([]string, 0, len(c.r.headers))
	for i := range c.r.headers {
		d.remove = append(d.remove, c.r.headers[i].header)
	}
	return d
}

func stepRequest(_ context.Context, c *check) *decision {
	var d *decision
	if c.rq, d = canonicalRequest(c.h); d != nil {
		return d
	}
	var ok bool
	if c.rq.client, ok = clientAddress(c.req, c.pol.clientHeader); !ok {
		return denyRequest("bad_client_address", "the "+c.pol.clientHeader+" header's last entry is not an IP address")
	}
	return nil
}

func stepRoute(_ context.Context, c *check) *decision {
	if name, named := c.req.GetAttributes().GetContextExtensions()["route"]; named {
		c.how = "named"
		if c.r = c.pol.byName[name]; c.r == nil {
			c.s.log.Error("context_extensions names an unknown route; check the Envoy route config", "route", name)
			return denyNoRoute("unknown_route", "no policy for this route")
		}
		return c.singleReadings()
	}
	c.how = "matched"
	r, amb := c.pol.match(&c.rq)
	switch {
	case amb != nil:
		return denyRequest(amb.reason, amb.desc)
	case r == nil:
		return denyNoRoute("no_route", "no route matches the request")
	}
	c.r = r
	return c.singleReadings()
}

// singleReadings refuses a request whose query or headers, read by the
// route's CEL, mean different things to different upstreams (400): a
// condition on one value must not be met by another.
func (c *check) singleReadings() *decision {
	if c.r.readsQuery {
		if why := queryAmbiguity(c.rq.query); why != "" {
			return denyRequest("ambiguous_query", why)
		}
	}
	if c.r.readsHeaders {
		if why := headerAmbiguity(c.h); why != "" {
			return denyRequest("ambiguous_headers", why)
		}
	}
	return nil
}

// stepCredentials finds the bearer token. Anonymous routes look at none,
// and allow_missing routes allow a request without one; both without
// identity (and so without the Authorization header: see headers).
func stepCredentials(_ context.Context, c *check) *decision {
	if c.r.anonymous {
		return c.allowWithoutIdentity("anonymous")
	}
	tok, scheme, d := credentials(c.h, c.rq.query, c.pol.maxTokenBytes)
	if d != nil && d.reason == "missing_token" && c.r.allowMissing {
		return c.allowWithoutIdentity("no_token")
	}
	c.tok, c.scheme = tok, scheme
	return d
}

// allowWithoutIdentity allows after the when conditions (which can still
// deny: a condition on the method or path needs no token) and with the
// headers of a request without identity.
func (c *check) allowWithoutIdentity(reason string) *decision {
	if d := stepWhen(context.Background(), c); d != nil {
		return d
	}
	if d := stepHeaders(context.Background(), c); d != nil {
		return d
	}
	return &decision{allow: true, reason: reason}
}

func stepToken(ctx context.Context, c *check) *decision {
	vp := c.r.vpol
	vp.Client = c.rq.client
	vp.Syntax = isToken68
	res, err := c.v.Verify(ctx, c.tok, vp)
	if err == nil {
		c.res = res
		return nil
	}
	ve := verify.AsError(err)
	c.verr = ve
	switch {
	case ctx.Err() != nil:
		// Envoy gave up (its timeout) or the client went away: not an
		// outage, and nobody reads the answer.
		c.s.log.Debug("check cancelled", "route", c.r.name, "issuer", ve.Issuer, "error", ctx.Err().Error())
		d := errUnavailable("the check was cancelled")
		d.reason, d.quiet, d.cancelled = "cancelled", true, true
		return d
	case ve.Kind == verify.Invalid:
		return denyInvalid(ve.Reason, ve.Desc)
	case ve.Reason == verify.ReasonThrottled:
		// The caller is over its share of provider calls: a deny for that
		// caller, never "undecidable" (under failure_mode_allow that would
		// let its own unverified requests through). Expected under a
		// flood: counted, not logged one by one.
		return denyThrottled()
	}
	// The cause names the issuer and endpoint, never the token.
	c.s.log.Warn("no decision possible", "route", c.r.name, "issuer", ve.Issuer, "error", err.Error())
	return errUnavailable("authorization is temporarily unavailable")
}

func stepRevocation(_ context.Context, c *check) *decision {
	if c.s.denylist == nil {
		return nil
	}
	res := c.res
	iat, _ := res.Claims.Time("iat")
	kind, revoked := c.s.denylist.Revoked(cache.Token{
		TokenHash: func() string { return cache.Hash(c.tok) },
		Issuer:    res.Issuer.ID(), JTI: res.Claims.Scalar("jti"), Sub: res.Claims.Scalar("sub"), IAT: iat,
	})
	if !revoked {
		return nil
	}
	c.revokedBy = kind
	return denyInvalid("revoked_"+kind, "token has been revoked")
}

// stepBinding checks a sender-constrained token's proof of possession on
// every request (the verified-token cache serves the token, never the
// proof): a DPoP proof for cnf.jkt (RFC 9449), the client certificate for
// cnf.x5t#S256 (RFC 8705). On if_bound routes only bound tokens are
// checked, so a stolen bound token is not a bearer token; required routes
// refuse unbound ones; none skips binding.
func stepBinding(ctx context.Context, c *check) *decision {
	if c.r.sender == senderNone {
		return nil
	}
	b := c.res.Binding()
	c.bound = b
	dp := c.res.Issuer.DPoP()
	switch {
	case b.Malformed:
		return denyInvalid("malformed", "the token's cnf claim is malformed")
	case b.Unsupported != "":
		// A binding we cannot check must not make the token a bearer
		// token: only sender_constraint none ignores it.
		return denyInvalid("unsupported_binding", "the token is bound by a confirmation method this server cannot check (cnf."+b.Unsupported+")")
	case !b.Bound() && c.scheme == schemeDPoP:
		return c.dpopDeny(dp, verify.ReasonUnbound, "invalid_token", "the token is not DPoP-bound")
	case !b.Bound() && c.r.sender == senderRequired:
		return denyInvalid("unbound_token", "this route requires a sender-constrained (DPoP or certificate-bound) token")
	case !b.Bound():
		return nil
	}
	if b.JKT != "" {
		if dp == nil {
			return denyInvalid("dpop_not_configured", "the token is DPoP-bound, and its issuer has no dpop settings here")
		}
		if c.scheme != schemeDPoP {
			return c.dpopDeny(dp, "dpop_as_bearer", "invalid_token", "a DPoP-bound token must be sent with the DPoP scheme and a proof")
		}
		proof, n := singleHeader(c.h, "dpop")
		if n > 1 {
			return c.dpopDeny(dp, verify.ReasonInvalidProof, verify.ReasonInvalidProof, "more than one DPoP proof")
		}
		scheme := c.rq.scheme
		if c.pol.schemeHeader != "" {
			if v, ok := headerList(c.h, c.pol.schemeHeader); ok {
				// The entry the nearest trusted proxy added.
				if scheme = strings.ToLower(lastListElement(v)); scheme != "http" && scheme != "https" {
					return denyRequest("bad_scheme", "the "+c.pol.schemeHeader+" header's last entry is not http or https")
				}
			}
		}
		err := dp.Check(ctx, proof, verify.ProofRequest{Method: c.rq.method,
			URI: verify.TargetURI(scheme, c.rq.host, c.rq.port, c.rq.path), Token: c.tok, JKT: b.JKT})
		if err != nil {
			ve := verify.AsError(err)
			oauth := ve.Reason
			if oauth != verify.ReasonInvalidProof && oauth != verify.ReasonUseNonce {
				oauth = "invalid_token"
			}
			d := c.dpopDeny(dp, ve.Reason, oauth, ve.Desc)
			if ve.Reason == verify.ReasonUseNonce {
				d.dpopNonce = dp.Nonce(ctx)
			}
			return d
		}
	}
	if b.X5TS256 != "" {
		got, err := c.clientCertThumbprint()
		switch {
		case err != nil:
			return denyInvalid("certificate_missing", "the token is bound to a client certificate: "+err.Error())
		case got != b.X5TS256:
			return denyInvalid("certificate_mismatch", "the token is bound to another client certificate")
		}
	}
	return nil
}

// dpopDeny is a 401 with a DPoP challenge (RFC 9449 §7.1).
func (c *check) dpopDeny(dp *verify.Proofs, reason, oauthError, desc string) *decision {
	d := denyInvalid(reason, desc)
	d.oauthError = oauthError
	d.challenge = schemeDPoP
	if dp != nil {
		d.algs = dp.Algs()
	}
	return d
}

// clientCertThumbprint is the x5t#S256 of the request's client certificate:
// Envoy's peer certificate, or, only when configured, the last element of
// a trusted proxy's XFCC header.
func (c *check) clientCertThumbprint() (string, error) {
	if c.pol.certHeader == "" {
		pem := c.req.GetAttributes().GetSource().GetCertificate()
		if pem == "" {
			return "", errors.New("the request has no client certificate")
		}
		return verify.CertificateThumbprint(pem)
	}
	v, _ := headerList(c.h, c.pol.certHeader)
	return xfccThumbprint(v)
}

func stepScopes(_ context.Context, c *check) *decision {
	if c.missing = c.r.missingScopes(c.res.Claims); len(c.missing) > 0 {
		return denyForbidden("insufficient_scope", "the token lacks a required scope", strings.Join(c.r.scopes, " "))
	}
	return nil
}

func stepClaims(_ context.Context, c *check) *decision {
	for i := range c.r.claims {
		rule := &c.r.claims[i]
		v, found := c.res.Lookup(rule.claim)
		if !found || !rule.satisfied(v) {
			c.claimAt, c.claimVal, c.claimHas = rule, v, found
			return denyForbidden("claim_mismatch", "claim "+rule.claim+" does not have an accepted value", "")
		}
	}
	return nil
}

// stepWhen evaluates the route's CEL conditions in order: the first false
// one, or one that fails to evaluate, denies with 403. An evaluation error
// is never taken as true.
func stepWhen(_ context.Context, c *check) *decision {
	if len(c.r.when) == 0 {
		return nil
	}
	c.bindVars()
	c.when = c.whenBuf[:0]
	for i := range c.r.when {
		w := &c.r.when[i]
		ok, err := w.expr.evalBool(&c.vars)
		c.when = append(c.when, whenOutcome{rule: w, ok: ok, err: err})
		switch {
		case err != nil:
			d := denyPolicy("when_error", "the request does not meet the route's conditions")
			d.detail = "when " + w.expr.src + ": " + err.Error()
			return d
		case !ok:
			d := denyPolicy("when_false", w.message)
			d.detail = w.message
			return d
		}
	}
	return nil
}

// stepHeaders computes the route's claim headers: each set from the first
// claim path present or from its expression, or removed, so a client's copy
// never reaches the upstream. Headers a route turns off (null) are removed
// too. An expression that fails to evaluate denies, like a condition.
func stepHeaders(_ context.Context, c *check) *decision {
	c.set = make([]*corev3.HeaderValueOption, 0, len(c.r.headers))
	for i := range c.r.headers {
		ch := &c.r.headers[i]
		if c.res != nil && !ch.off {
			if ch.expr != nil {
				c.bindVars()
				s, err := ch.expr.evalHeader(&c.vars)
				if err != nil {
					d := denyPolicy("header_error", "the request does not meet the route's conditions")
					d.detail = "header " + ch.header + ": " + err.Error()
					return d
				}
				if s != "" && validHeaderValue(s) {
					c.set = append(c.set, setHeader(ch.header, s))
					continue
				}
			} else if s, ok := c.claimHeader(ch); ok {
				c.set = append(c.set, setHeader(ch.header, s))
				continue
			}
		}
		c.remove = append(c.remove, ch.header)
	}
	return nil
}

// claimHeader renders the first of ch's claim paths the token has; one
// that cannot be a header (or only ambiguously) counts as absent.
func (c *check) claimHeader(ch *claimHeader) (string, bool) {
	for _, path := range ch.claims {
		if v, found := c.res.Lookup(path); found {
			if s, fine := verify.FormatClaim(v); fine && validHeaderValue(s) {
				return s, true
			}
		}
	}
	return "", false
}

func (c *check) bindVars() {
	if c.vars.rq == nil {
		c.vars = celVars{rq: &c.rq, h: c.h, ctxExt: c.req.GetAttributes().GetContextExtensions(), res: c.res, route: c.r.name}
	}
}

// trail collects the steps of a decision for Explain, rendered from what
// each step left in the check.
type trail struct {
	steps []string
	whens []WhenResult
}

func (t *trail) add(format string, args ...any) {
	t.steps = append(t.steps, fmt.Sprintf(format, args...))
}

func (t *trail) step(name string, c *check, d *decision) {
	switch name {
	case "request":
		if d != nil {
			t.add("request refused before route matching: %s (it has no single meaning across upstreams)", d.desc)
		}
	case "route":
		switch {
		case d != nil && c.how == "named":
			t.add("context_extensions names route %q, which the config does not have", c.req.GetAttributes().GetContextExtensions()["route"])
		case d != nil && strings.HasPrefix(d.reason, "ambiguous_"):
			t.add("%s %s on host %q: %s, so an upstream could serve another route than the one checked", c.rq.method, c.rq.path, c.rq.host, d.desc)
		case d != nil:
			t.add("no route matches %s %s on host %q", c.rq.method, c.rq.path, c.rq.host)
		case c.how == "named":
			t.add("route %q, named by Envoy's context_extensions", c.r.name)
		default:
			t.add("route %q: the first whose match fits %s %s on host %q", c.r.name, c.rq.method, c.rq.path, c.rq.host)
		}
	case "credentials":
		switch {
		case d != nil && d.allow && d.reason == "anonymous":
			t.when(c)
			t.add("route %q is anonymous: no token looked at (claim and Authorization headers are stripped)", c.r.name)
		case d != nil && d.allow:
			t.when(c)
			t.add("no bearer token, and route %q allows a missing one: allowed with no identity (claim and Authorization headers stripped)", c.r.name)
		case d != nil && (d.reason == "when_false" || d.reason == "when_error" || d.reason == "header_error"):
			t.when(c)
		case d != nil:
			t.add("credentials: %s", d.desc)
		default:
			t.add("bearer token: %d bytes, %s, sha256 prefix %s", len(c.tok), verify.Describe(c.tok), TokenHash(c.tok))
			t.add("issuers accepted on route %q: %s", c.r.name, strings.Join(c.r.vpol.Issuers, ", "))
		}
	case "token":
		switch {
		case d == nil:
			t.add("token verified: issuer %q, %s, keys from %s%s", c.res.Issuer.Name(), c.res.Kind, orDash(c.res.KeySource), answerNote(c.res))
		case c.verr.Kind == verify.Invalid:
			t.add("token refused (%s): %s", c.verr.Reason, c.verr.Desc)
		default:
			t.add("no decision possible: %v", c.verr)
		}
	case "revocation":
		if d != nil {
			t.add("revoked by %s", c.revokedBy)
		}
	case "binding":
		switch {
		case d != nil:
			t.add("sender constraint: %s", d.desc)
		case c.bound.JKT != "" || c.bound.X5TS256 != "":
			t.add("sender constraint: the DPoP proof or client certificate matches the token's cnf")
		}
	case "scopes":
		switch {
		case d != nil:
			t.add("scopes: route needs %q, token has %q: missing %q", c.r.scopes, c.res.Claims.Scopes(), c.missing)
		case len(c.r.scopes) > 0:
			t.add("scopes: route needs %q: all present", c.r.scopes)
		}
	case "claims":
		for i := range c.r.claims {
			rule := &c.r.claims[i]
			if rule != c.claimAt {
				t.add("claim %s: accepted value", rule.claim)
				continue
			}
			got := "absent"
			if c.claimHas {
				got, _ = verify.FormatClaim(c.claimVal)
				got = fmt.Sprintf("%q (%T)", got, c.claimVal)
			}
			t.add("claim %s: is %s, accepted: %s", rule.claim, got, rule.describe())
			break
		}
	case "when":
		t.when(c)
	}
}

// when renders each evaluated condition; for a false or failed one, the
// values of the variables it read.
func (t *trail) when(c *check) {
	for _, o := range c.when {
		idx := 0
		for i := range c.r.when {
			if &c.r.when[i] == o.rule {
				idx = i
			}
		}
		t.whens = append(t.whens, WhenResult{Route: c.r.name, Index: idx, Expr: o.rule.expr.src, Result: o.ok && o.err == nil, Err: o.err})
		switch {
		case o.err != nil:
			t.add("when %s: error: %v (denied)%s", o.rule.expr.src, o.err, t.varsOf(c, o.rule.expr))
		case !o.ok:
			t.add("when %s: false%s", o.rule.expr.src, t.varsOf(c, o.rule.expr))
		default:
			t.add("when %s: true", o.rule.expr.src)
		}
	}
	c.when = c.when[:0]
}

func (t *trail) varsOf(c *check, e *celExpr) string {
	var b strings.Builder
	for _, name := range e.vars {
		v, _ := c.vars.ResolveName(name)
		fmt.Fprintf(&b, "\n       %s = %s", name, describeVal(v))
	}
	return b.String()
}
