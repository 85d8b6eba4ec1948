package authz_test

import (
	"fmt"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// requestFixture: the main fixture plus a host-restricted route and a
// route under a path whose letter case matters, each needing scope admin.
func requestFixture(t *testing.T) (c func(req) (code codes.Code, status typev3.StatusCode, desc string), read string) {
	t.Helper()
	idp, keys, cfg := mainFixture(t)
	cfg.Routes = append([]authz.RouteConfig{
		{Name: "ops", Match: authz.Match{Host: "ops.example.com"}, Scopes: []string{"admin"}},
		{Name: "kv", Match: authz.Match{PathPrefix: "/kv"}, Scopes: []string{"admin"}},
	}, cfg.Routes...)
	client := start(t, cfg, nil)
	m := idp.Claims(aud)
	m["scope"] = "read"
	read = idptest.Mint(t, keys["RS256"], m)
	return func(r req) (codes.Code, typev3.StatusCode, string) {
		resp := check(t, client, r)
		if _, err := proto.Marshal(resp); err != nil {
			t.Fatalf("response does not marshal: %v", err)
		}
		code := codes.Code(resp.GetStatus().GetCode())
		if code == codes.OK {
			return code, 200, ""
		}
		return code, resp.GetDeniedResponse().GetStatus().GetCode(), resp.GetStatus().GetMessage()
	}, read
}

// TestNonCanonicalRequestsRefused: every request whose meaning could differ
// between upstreams is a 400 invalid_request, with or without a token, and
// before any route (anonymous ones included) is chosen.
func TestNonCanonicalRequestsRefused(t *testing.T) {
	c, read := requestFixture(t)
	paths := []string{
		// path parameters, raw and encoded
		"/public/..;/admin", "/public;x/../admin", "/admin;x", "/public/%3b/x", "/public/..%3B/admin", "/public/x;jsessionid=1",
		// dot segments in every spelling
		"/public/../admin", "/public/./x", "/public/.%2e/admin", "/public/%2e%2e/admin", "/public/%2E%2E/admin", "/public/%2e/x",
		// double encoding, encoded and raw separators
		"/public/%252e%252e/admin", "/public/%25%32%65", "/public%2fadmin", "/public%2Fadmin", "/public%5cadmin", `/public\..\admin`,
		// empty segments
		"//admin", "/public//x", "/public/x//", "//",
		// trailing dots and spaces
		"/admin.", "/admin%2e", "/admin%20", "/public/x.", "/public/x...",
		// control characters, spaces, characters outside RFC 3986
		"/public/x%00", "/public/x%0d%0a", "/public/x%09", "/public/a b", "/public/x\x7f", "/public/x#frag", "/public/<x>", "/public/x|y",
		// non-ASCII: raw, not UTF-8, overlong, and best-fit confusables
		"/public/caf\u00e9", "/public/caf%e9", "/%c0%ae%c0%ae/admin", "/public/%ef%bc%8f..%ef%bc%8fadmin",
		"/public/%e2%80%a4%e2%80%a4/admin", "/public/%ef%bc%8e%ef%bc%8e", "/public/%e2%80%ae",
		// IIS %u encoding, malformed escapes, no leading slash
		"/public/%u002e%u002e/admin", "/public/%", "/public/%zz", "public", "*",
		// letter case selecting a weaker (or different) route
		"/ADMIN", "/Admin/users", "/PUBLIC/x", "/Public", "/%E2%84%AAv", // KELVIN SIGN + "v" folds to /kv
	}
	for _, p := range paths {
		for _, tok := range []string{"", read} {
			r := req{path: p}
			if tok != "" {
				r.headers = bearer(tok)
			}
			code, status, desc := c(r)
			if code != codes.InvalidArgument || status != typev3.StatusCode_BadRequest {
				t.Errorf("%q (token: %v): %v %v %q, want 400 invalid_request", p, tok != "", code, status, desc)
			}
		}
	}
}

func TestCanonicalRequestsMatch(t *testing.T) {
	c, read := requestFixture(t)
	type want struct {
		code   codes.Code
		status typev3.StatusCode
	}
	allow := want{codes.OK, 200}
	forbidden := want{codes.PermissionDenied, typev3.StatusCode_Forbidden}
	bad := want{codes.InvalidArgument, typev3.StatusCode_BadRequest}
	for _, tc := range []struct {
		name string
		r    req
		want want
	}{
		{"trailing slash", req{path: "/orders/"}, allow},
		{"dots inside a segment", req{path: "/orders/a.b/..x"}, allow},
		{"UTF-8, percent-encoded", req{path: "/orders/caf%C3%A9"}, allow},
		{"the query is not the path", req{path: "/orders?next=/../admin;x&y=%2e%2e"}, allow},
		{"lower-case path under a case-insensitive twin", req{path: "/kvstore"}, allow},
		// Matching sees the decoded path, as the upstream does.
		{"encoded letters decode to /admin", req{path: "/%61dmin/users"}, forbidden},
		{"encoded letters decode to /kv", req{path: "/%6bv/x"}, forbidden},
		// Hosts: case, port and one trailing dot do not escape a host route.
		{"host in upper case", req{host: "OPS.example.com"}, forbidden},
		{"host with a trailing dot", req{host: "ops.example.com."}, forbidden},
		{"host with a trailing dot and port", req{host: "ops.example.com.:443"}, forbidden},
		{"IPv6 literal host", req{host: "[::1]:8443"}, allow},
		{"host with two trailing dots", req{host: "ops.example.com.."}, bad},
		{"host with whitespace", req{host: "ops.example.com "}, bad},
		{"host with user info", req{host: "x@ops.example.com"}, bad},
		{"host percent-encoded", req{host: "ops%2eexample.com"}, bad},
		{"host with an empty label", req{host: "ops..example.com"}, bad},
		{"host with a bad port", req{host: "ops.example.com:x"}, bad},
		{"host not ASCII", req{host: "ops.ex\u00e4mple.com"}, bad},
		// Methods: a lower-case method does not escape a method route.
		{"POST needs orders:write", req{method: "POST", path: "/orders"}, forbidden},
		{"post is refused", req{method: "post", path: "/orders"}, bad},
		{"Post is refused", req{method: "Post", path: "/orders"}, bad},
		{"method with a space", req{method: "POST ", path: "/orders"}, bad},
		{"method with a control character", req{method: "PO\x00ST", path: "/orders"}, bad},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.r.headers = bearer(read)
			code, status, desc := c(tc.r)
			if code != tc.want.code || status != tc.want.status {
				t.Fatalf("got %v %v %q, want %v %v", code, status, desc, tc.want.code, tc.want.status)
			}
		})
	}
}

// TestRawHeadersWin: with encode_raw_headers, the request's own bytes (in
// header_map) are matched, not Envoy's sanitized string fields, and non-UTF-8
// bytes get a 400, never a transport error.
func TestRawHeadersWin(t *testing.T) {
	c, read := requestFixture(t)
	for _, tc := range []struct {
		path, sanitized string
		want            codes.Code
	}{
		{"/public/\xff/../admin", "/public/!/../admin", codes.InvalidArgument},
		{"/public/x\xc3", "/public/x!", codes.InvalidArgument},
		{"/%61dmin", "/public", codes.PermissionDenied}, // the raw bytes name /admin
		{"/orders/1", "/orders/1", codes.OK},
	} {
		r := req{path: tc.sanitized, raw: rawHeaders(":method", "GET", ":authority", "api.example.com", "authorization", "Bearer "+read)}
		r.raw = append(r.raw, &corev3.HeaderValue{Key: ":path", RawValue: []byte(tc.path)})
		if code, _, desc := c(r); code != tc.want {
			t.Errorf("raw path %q (sanitized %q): %v %q, want %v", tc.path, tc.sanitized, code, desc, tc.want)
		}
	}
}

// TestDenyMessagesAreUTF8: a token field with multi-byte characters, cut for
// a message, still gives a deny that marshals (the gRPC client would see
// INTERNAL otherwise), and so does any request the deny echoes.
func TestDenyMessagesAreUTF8(t *testing.T) {
	c, _ := requestFixture(t)
	for _, alg := range []string{strings.Repeat("€", 20), "ES256" + strings.Repeat("é", 10), strings.Repeat("\U0001F600", 8)} {
		h := b64(fmt.Sprintf(`{"alg":%q,"typ":"JWT"}`, alg))
		tok := h + "." + b64(`{"iss":"x","sub":"y"}`) + ".AAAA"
		code, status, desc := c(req{headers: bearer(tok)})
		if code != codes.Unauthenticated || status != typev3.StatusCode_Unauthorized {
			t.Errorf("alg %q: %v %v %q", alg, code, status, desc)
		}
	}
}

func TestCredentialRules(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	cfg.Routes = append([]authz.RouteConfig{
		{Name: "catalog", Match: authz.Match{PathPrefix: "/catalog"}, AllowMissing: true},
	}, cfg.Routes...)
	c := start(t, cfg, nil)
	good := idptest.Mint(t, keys["RS256"], idp.Claims(aud))

	// ";" separates query parameters for some servers: a token there is a
	// second credential.
	for _, q := range []string{"?a=1;access_token=x", "?access_token=x", "?a=1&access%5Ftoken=x", ";"} {
		r := req{path: "/orders" + q, headers: bearer(good)}
		if q == ";" {
			r.path = "/orders?x;access_token=y"
		}
		denied(t, check(t, c, r), codes.InvalidArgument, typev3.StatusCode_BadRequest, "more than one credential")
	}

	// Anonymous routes look at no token and forward none.
	_, removed := allowed(t, check(t, c, req{path: "/public/x", headers: bearer("forged")}))
	if !contains(removed, "authorization") {
		t.Errorf("anonymous route forwards Authorization: removed %v", removed)
	}

	// allow_missing: absent is an allow without identity, present is checked.
	set, removed := allowed(t, check(t, c, req{path: "/catalog/1", headers: map[string]string{"x-user-id": "admin"}}))
	if len(set) != 0 || !contains(removed, "x-user-id") || !contains(removed, "authorization") {
		t.Errorf("no token: set %v, removed %v", set, removed)
	}
	set, removed = allowed(t, check(t, c, req{path: "/catalog/1", headers: map[string]string{"authorization": "Basic dXNlcjpw"}}))
	if len(set) != 0 || !contains(removed, "authorization") {
		t.Errorf("another scheme: set %v, removed %v", set, removed)
	}
	set, removed = allowed(t, check(t, c, req{path: "/catalog/1", headers: bearer(good)}))
	if set["x-user-id"] != "user-1" || contains(removed, "authorization") {
		t.Errorf("valid token: set %v, removed %v", set, removed)
	}
	denied(t, check(t, c, req{path: "/catalog/1", headers: bearer("not-a-valid.token.x")}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_token"`)
	denied(t, check(t, c, req{path: "/catalog/1", headers: bearer(good + "x")}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_token"`)
}

// TestArrayClaimHeadersAreUnambiguous: an array claim becomes a
// comma-separated header only when every element reads back as itself.
func TestArrayClaimHeadersAreUnambiguous(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	c := start(t, cfg, nil)
	for _, tc := range []struct {
		groups []any
		want   string // "" for not sent (removed)
	}{
		{[]any{"eng", "ops"}, "eng,ops"},
		{[]any{"eng", 7, true}, "eng,7,true"},
		{[]any{"dev,admin", "ops"}, ""},
		{[]any{`"dev,admin"`}, ""},
		{[]any{" admin"}, ""},
		{[]any{"admin", ""}, ""},
		{[]any{[]any{"a", "b"}, "c"}, ""},
		{[]any{map[string]any{"x": "y"}}, ""},
	} {
		m := idp.Claims(aud)
		m["groups"] = tc.groups
		set, removed := allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, keys["RS256"], m))}))
		got, sent := set["x-auth-groups"]
		switch {
		case tc.want == "" && (sent || !contains(removed, "x-auth-groups")):
			t.Errorf("%v: sent as %q, want removed", tc.groups, got)
		case tc.want != "" && got != tc.want:
			t.Errorf("%v: %q, want %q", tc.groups, got, tc.want)
		}
	}
}

// TestManyReservedHeaders: thousands of client headers under the reserved
// prefix are each removed once (the cost is in BenchmarkManyHeaders).
func TestManyReservedHeaders(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	c := start(t, cfg, nil)
	tok := idptest.Mint(t, keys["RS256"], idp.Claims(aud))
	raw := rawHeaders("authorization", "Bearer "+tok)
	for i := range 5000 {
		raw = append(raw, &corev3.HeaderValue{Key: fmt.Sprintf("x-auth-h%d", i%2500), RawValue: []byte("v")})
	}
	_, removed := allowed(t, check(t, c, req{raw: raw}))
	seen := map[string]bool{}
	for _, h := range removed {
		if seen[h] {
			t.Fatalf("%s removed twice", h)
		}
		seen[h] = true
	}
	if !seen["x-auth-h0"] || !seen["x-auth-h2499"] || len(removed) < 2500 {
		t.Fatalf("removed %d headers", len(removed))
	}
}
