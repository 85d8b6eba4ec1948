package authz

import (
	"encoding/json"
	"slices"
	"strings"
	"unicode/utf8"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/tokenauthz/tokenauthz/verify"
)

// decision is the outcome of one Check before it becomes a CheckResponse.
type decision struct {
	allow bool
	// For denials and errors:
	code       codes.Code
	httpStatus typev3.StatusCode
	oauthError string // RFC 6750 error code; "" when the token is missing
	desc       string // safe for clients
	scope      string // for insufficient_scope
	reason     string // stable, for logs and metrics
	quiet      bool   // counted, but no log line (floods)
	cancelled  bool   // Envoy or the client gave up: counted as cancelled
	issuer     string // the issuer a refused token named, when no result
	detail     string // for the log line only: which condition, which error
	retryAfter string // Retry-After, for 429
	// DPoP challenges (RFC 9449 §7.1): the scheme ("" for Bearer), the
	// accepted algorithms and a fresh nonce for use_dpop_nonce.
	challenge, algs, dpopNonce string
	// dryRun: a dry-run route's allow; wouldBe is the decision it replaced
	// (nil: the route would have allowed too).
	dryRun  bool
	wouldBe *decision
	// step is the step that decided a deny ("" for an allow).
	step string
	// event is the decision log's event in the making (nil: not sampled).
	event *DecisionEvent
	// For allows: the route's claim headers, set and removed.
	set    []*corev3.HeaderValueOption
	remove []string
	// Filled as the check goes:
	route  *route
	result *verify.Result
}

func denyMissing() *decision {
	return &decision{code: codes.Unauthenticated, httpStatus: typev3.StatusCode_Unauthorized,
		reason: "missing_token", desc: "a bearer token is required"}
}

func denyInvalid(reason, desc string) *decision {
	return &decision{code: codes.Unauthenticated, httpStatus: typev3.StatusCode_Unauthorized,
		oauthError: "invalid_token", reason: reason, desc: desc}
}

func denyRequest(reason, desc string) *decision {
	return &decision{code: codes.InvalidArgument, httpStatus: typev3.StatusCode_BadRequest,
		oauthError: "invalid_request", reason: reason, desc: desc}
}

func denyForbidden(reason, desc, scope string) *decision {
	return &decision{code: codes.PermissionDenied, httpStatus: typev3.StatusCode_Forbidden,
		oauthError: "insufficient_scope", reason: reason, desc: desc, scope: scope}
}

// denyPolicy: the route's conditions are not met (403 without an OAuth
// error: not a scope the client could ask for).
func denyPolicy(reason, desc string) *decision {
	return &decision{code: codes.PermissionDenied, httpStatus: typev3.StatusCode_Forbidden,
		reason: reason, desc: desc}
}

func denyNoRoute(reason, desc string) *decision {
	return &decision{code: codes.PermissionDenied, httpStatus: typev3.StatusCode_Forbidden,
		reason: reason, desc: desc}
}

// denyThrottled: the caller is over its share of provider calls (429).
func denyThrottled() *decision {
	return &decision{code: codes.ResourceExhausted, httpStatus: typev3.StatusCode_TooManyRequests,
		reason: "throttled", desc: "too many requests with tokens that need the provider; retry later",
		retryAfter: "1", quiet: true}
}

func errUnavailable(desc string) *decision {
	return &decision{code: codes.Unavailable, httpStatus: typev3.StatusCode_ServiceUnavailable,
		reason: "unavailable", desc: desc}
}

func errInternal() *decision {
	return &decision{code: codes.Internal, httpStatus: typev3.StatusCode_InternalServerError,
		reason: "internal", desc: "internal error"}
}

// setHeader builds a header mutation that overwrites on every Envoy version:
// Envoy up to 1.36 reads only append, later ones read append first and then
// append_action (see Envoy issue 43310).
func setHeader(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: k, Value: v},
		Append:       appendFalse,
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

// appendFalse is shared by every response: gRPC only reads it.
var appendFalse = wrapperspb.Bool(false)

// response turns a decision into a CheckResponse. Denials are denied_response;
// UNAVAILABLE becomes an error_response (Envoy ≥ 1.37 treats it as an error,
// so failure_mode_allow and status_on_error apply; older Envoys see a non-OK
// status and deny).
func (d *decision) response(p *policy, reqHeaders map[string]string, headerMap []*corev3.HeaderValue) *authv3.CheckResponse {
	if d.allow {
		return d.allowResponse(p, reqHeaders, headerMap)
	}
	// Every string of a CheckResponse must be UTF-8 or it does not marshal,
	// and a gRPC error lets the request through under failure_mode_allow.
	d.desc = safeText(d.desc, maxDescBytes)
	body, _ := json.Marshal(struct {
		Error string `json:"error"`
		Desc  string `json:"error_description,omitempty"`
	}{Error: d.reasonForBody(), Desc: d.desc})
	hdrs := []*corev3.HeaderValueOption{setHeader("content-type", "application/json")}
	if d.httpStatus == typev3.StatusCode_Unauthorized || d.oauthError != "" {
		hdrs = append(hdrs, setHeader("www-authenticate", d.wwwAuthenticate(p.realm)))
	}
	if d.retryAfter != "" {
		hdrs = append(hdrs, setHeader("retry-after", d.retryAfter))
	}
	if d.dpopNonce != "" {
		hdrs = append(hdrs, setHeader("dpop-nonce", d.dpopNonce))
	}
	denied := &authv3.DeniedHttpResponse{
		Status:  &typev3.HttpStatus{Code: d.httpStatus},
		Headers: hdrs,
		Body:    string(body),
	}
	resp := &authv3.CheckResponse{Status: &status.Status{Code: int32(d.code), Message: d.desc}}
	if d.code == codes.Unavailable {
		resp.HttpResponse = &authv3.CheckResponse_ErrorResponse{ErrorResponse: denied}
	} else {
		resp.HttpResponse = &authv3.CheckResponse_DeniedResponse{DeniedResponse: denied}
	}
	return resp
}

func (d *decision) reasonForBody() string {
	if d.oauthError != "" {
		return d.oauthError
	}
	return d.reason
}

// wwwAuthenticate renders RFC 6750 §3. The error attribute is left out when
// no token was sent (§3.1).
func (d *decision) wwwAuthenticate(realm string) string {
	var b strings.Builder
	if d.challenge == schemeDPoP {
		b.WriteString(`DPoP realm="`)
	} else {
		b.WriteString(`Bearer realm="`)
	}
	b.WriteString(realm)
	b.WriteByte('"')
	if d.algs != "" {
		b.WriteString(`, algs="`)
		b.WriteString(quoteSafe(d.algs))
		b.WriteByte('"')
	}
	if d.oauthError != "" {
		b.WriteString(`, error="`)
		b.WriteString(d.oauthError)
		b.WriteString(`", error_description="`)
		b.WriteString(quoteSafe(d.desc))
		b.WriteByte('"')
	}
	if d.scope != "" {
		b.WriteString(`, scope="`)
		b.WriteString(quoteSafe(d.scope))
		b.WriteByte('"')
	}
	return b.String()
}

// quoteSafe keeps RFC 6750's allowed characters for error_description and
// scope (%x20-21 / %x23-5B / %x5D-7E): no quotes, backslashes or controls.
func quoteSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e || r == '"' || r == '\\' {
			return '_'
		}
		return r
	}, s)
}

func (d *decision) allowResponse(p *policy, reqHeaders map[string]string, headerMap []*corev3.HeaderValue) *authv3.CheckResponse {
	// Claim headers (the headers step) are set, or removed when there is
	// no value, so a client's copy never reaches the upstream.
	ok := &authv3.OkHttpResponse{Headers: d.set}
	remove := d.remove
	if d.route != nil {
		remove = append(remove, p.otherHeaders[d.route]...)
	}
	{
		// One pass over the request's headers, deduplicated after: a
		// request with many reserved headers costs linear time, not a
		// scan of the removal list per header. Besides the reserved
		// prefix, a claim header sent with "_" for "-" (x_user_id) goes
		// too: CGI-style upstreams read it as the claim header.
		n := len(remove)
		strip := func(k string) {
			if p.reserved != "" && len(k) >= len(p.reserved) && strings.EqualFold(k[:len(p.reserved)], p.reserved) {
				k = strings.ToLower(k)
				if d.route == nil || !d.route.isClaimHeader(k) {
					remove = append(remove, k)
				}
				return
			}
			if strings.IndexByte(k, '_') >= 0 {
				dashed := strings.ReplaceAll(strings.ToLower(k), "_", "-")
				if p.claimHeaders[dashed] || p.reserved != "" && strings.HasPrefix(dashed, p.reserved) {
					remove = append(remove, strings.ToLower(k))
				}
			}
		}
		for k := range reqHeaders {
			strip(k)
		}
		for _, h := range headerMap {
			strip(h.GetKey())
		}
		if extra := remove[n:]; len(extra) > 1 {
			slices.Sort(extra)
			remove = append(remove[:n], slices.Compact(extra)...)
		}
	}
	// An allow with no verified token (anonymous, or a missing token where
	// that is allowed) must not forward the client's Authorization header
	// as if it had been checked.
	if p.stripAuthz || d.result == nil {
		remove = append(remove, "authorization")
	}
	ok.HeadersToRemove = remove
	resp := &authv3.CheckResponse{
		Status:       okStatus,
		HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: ok},
	}
	resp.DynamicMetadata = d.metadata(p)
	return resp
}

// okStatus is shared by every allow: gRPC only reads it.
var okStatus = &status.Status{Code: int32(codes.OK)}

// metadata is what Envoy's later filters and access logs see, under the
// namespace envoy.filters.http.ext_authz: the fields dynamic_metadata asks
// for (nil for none). Route and issuer values are built once per config.
func (d *decision) metadata(p *policy) *structpb.Struct {
	m := p.meta
	if !m.route && !m.issuer && !m.sub && !m.scope && !d.dryRun {
		return nil
	}
	f := make(map[string]*structpb.Value, 4)
	if d.dryRun {
		// What the route would have answered, for later filters and logs.
		f["dry_run"] = structpb.NewBoolValue(true)
		would, reason := "allow", "ok"
		if w := d.wouldBe; w != nil {
			would, reason = w.info(0).Decision, w.reason
		}
		f["dry_run_decision"] = structpb.NewStringValue(would)
		f["dry_run_reason"] = structpb.NewStringValue(reason)
	}
	if m.route {
		f["route"] = d.route.metaName
	}
	if r := d.result; r != nil {
		if m.issuer {
			f["issuer"] = p.issuerValue(r.Issuer.Name())
		}
		if sub := r.Claims.String("sub"); m.sub && sub != "" {
			f["sub"] = structpb.NewStringValue(sub)
		}
		if m.scope {
			switch sc := r.Claims["scope"].(type) {
			case string: // the usual form: as it is, no re-joining
				if sc != "" {
					f["scope"] = structpb.NewStringValue(sc)
				}
			default:
				if scopes := r.Claims.Scopes(); len(scopes) > 0 {
					f["scope"] = structpb.NewStringValue(strings.Join(scopes, " "))
				}
			}
		}
	}
	return &structpb.Struct{Fields: f}
}

// validHeaderValue refuses invalid UTF-8 (the CheckResponse would not
// marshal), control characters (CR/LF would be a header
// injection; Envoy with validate_mutations answers 500 on them) and values
// too long for common proxies.
func validHeaderValue(s string) bool {
	if len(s) > 8192 || !utf8.ValidString(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// maxDescBytes bounds a deny's description: it goes to the client in a
// header and the body.
const maxDescBytes = 256

// safeText makes s valid UTF-8 and at most max bytes, cut at a rune
// boundary, never inside one.
func safeText(s string, max int) string {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	if len(s) <= max {
		return s
	}
	cut := max - len("…")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}
