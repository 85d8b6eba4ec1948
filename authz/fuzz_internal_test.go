package authz

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/url"
	"runtime"
	"strings"
	"testing"
	"unicode/utf8"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
)

// FuzzCredentials: token extraction never panics, and whatever it returns
// as a token is non-empty and within the size limit, from a request with
// one credential (its b64token syntax is checked by the verifier).
func FuzzCredentials(f *testing.F) {
	for _, s := range []string{"Bearer abc.def.ghi", "bearer  x", "Basic dXNlcjpw", "Bearer a,Bearer b", "Bearer ", "Bearer a=b", "", "Bearer \x00"} {
		f.Add(s, "/p?access_token=x")
		f.Add(s, "/p?a=1;access_token=x")
		f.Add(s, "/p")
	}
	f.Fuzz(func(t *testing.T, auth, path string) {
		h := &authv3.AttributeContext_HttpRequest{Path: path, Headers: map[string]string{"authorization": auth}}
		_, query, _ := strings.Cut(path, "?")
		tok, _, d := credentials(h, query, 64)
		if d != nil {
			if tok != "" || d.allow {
				t.Fatalf("a denial with a token or an allow: %q %+v", tok, d)
			}
			return
		}
		// The b64token syntax is the verifier's to check (on a cache miss):
		// what extraction hands on is one bounded, non-empty credential.
		if tok == "" || len(tok) > 64 || strings.Contains(auth, ",") {
			t.Fatalf("extracted %q from %q", tok, auth)
		}
	})
}

// FuzzRequestPath: the path check never panics, and a path it accepts is
// canonical: no dot segment, path parameter, encoded or raw separator,
// empty inner segment, trailing dot or space, control character or invalid
// UTF-8 in any spelling, and decoding it once more changes nothing.
func FuzzRequestPath(f *testing.F) {
	for _, s := range []string{"/a/b", "/a/../b", "/a/%2e%2e/b", "/a%2fb", `/a\b`, "/a/./b", "/a?x=../y", "", "/%", "/%zz",
		"/public/..;/admin", "/a;x", "/a%3bx", "/%252e%252e/", "//a", "/a//b", "/a/", "/a.", "/a%20", "/%c0%ae%c0%ae/",
		"/%ef%bc%8f", "/%e2%80%a4%e2%80%a4", "/caf%c3%a9", "/a\x00", "/ADMIN", "/%u002e"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		p, _, why := canonicalPath(raw)
		if why != "" {
			if p != "" {
				t.Fatalf("refused %q but returned a path %q", raw, p)
			}
			return
		}
		if !strings.HasPrefix(p, "/") || !utf8.ValidString(p) || strings.ContainsAny(p, ";\\%") {
			t.Fatalf("accepted %q as %q", raw, p)
		}
		if dec, err := url.PathUnescape(p); err == nil && dec != p {
			t.Fatalf("accepted %q as %q, which decodes again to %q", raw, p, dec)
		}
		segs := strings.Split(p[1:], "/")
		for i, seg := range segs {
			if seg == "" && i != len(segs)-1 || seg == "." || seg == ".." ||
				strings.HasSuffix(seg, ".") || strings.HasSuffix(seg, " ") ||
				strings.IndexFunc(seg, func(r rune) bool { return r < 0x20 || r == 0x7f }) >= 0 {
				t.Fatalf("accepted %q (segment %q)", raw, seg)
			}
		}
	})
}

// FuzzXFCC: whatever a client puts in its part of x-forwarded-client-cert,
// the certificate read is the one the trusted proxy appended, or none
// (the header is refused): never a value from the client's elements. The
// same whether Envoy sends the header joined or as separate lines.
func FuzzXFCC(f *testing.F) {
	const trusted = "Hash=" + fuzzHash
	for _, s := range []string{"", "Hash=" + otherHash, `Hash=` + otherHash + `;Subject="`, `Subject="\"`, `By=a;Subject="CN=x,O=y"`,
		`Hash=` + otherHash + `;Subject="x\\"`, `a=b;;`, "Hash=\"" + otherHash + "\"", `Cert="%2D%2D"`, "x=\"\\\"\",Hash=" + otherHash} {
		f.Add(s)
	}
	want := fuzzThumbprint()
	f.Fuzz(func(t *testing.T, client string) {
		got, err := xfccThumbprint(client + "," + trusted)
		if err == nil && got != want {
			t.Fatalf("read %q from client part %q", got, client)
		}
		h := &authv3.AttributeContext_HttpRequest{HeaderMap: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: "x-forwarded-client-cert", RawValue: []byte(client)}, {Key: "x-forwarded-client-cert", RawValue: []byte(trusted)}}}}
		v, _ := headerList(h, "x-forwarded-client-cert")
		got2, err2 := xfccThumbprint(v)
		if err2 == nil && got2 != want {
			t.Fatalf("read %q from raw client line %q", got2, client)
		}
		_, _ = parseXFCC(client) // never panics
	})
}

const (
	fuzzHash  = "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"
	otherHash = "0000000000000000000000000000000000000000000000000000000000000000"
)

func fuzzThumbprint() string {
	b, _ := hex.DecodeString(fuzzHash)
	return base64.RawURLEncoding.EncodeToString(b)
}

// FuzzClientAddress: the client's entries of the address header never
// become the address: it is the entry the nearest proxy appended, raw or
// joined, or the request is refused.
func FuzzClientAddress(f *testing.F) {
	for _, s := range []string{"", "203.0.113.9", "1.2.3.4, 5.6.7.8", "[::1]:80", "unknown", ",,,", "x\x00y", "2001:db8::1%eth0"} {
		f.Add(s)
	}
	const trusted = "192.0.2.77"
	f.Fuzz(func(t *testing.T, client string) {
		joined := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
			Http: &authv3.AttributeContext_HttpRequest{Headers: map[string]string{"x-forwarded-for": client + ", " + trusted}}}}}
		raw := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
			Http: &authv3.AttributeContext_HttpRequest{HeaderMap: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
				{Key: "x-forwarded-for", RawValue: []byte(client)}, {Key: "X-Forwarded-For", RawValue: []byte(trusted)}}}}}}}
		for _, r := range []*authv3.CheckRequest{joined, raw} {
			if got, ok := clientAddress(r, "x-forwarded-for"); !ok || got != trusted {
				t.Fatalf("client part %q gave %q (%v)", client, got, ok)
			}
		}
	})
}

// TestRepeatedInputsLinear (issue 20, class 10): the per-request structures
// built from repeated inputs cost linear work: doubling 5,000 duplicate
// headers doubles the bytes allocated (a quadratic join quadruples them).
// Allocation counts, not time: they do not depend on the machine's load.
func TestRepeatedInputsLinear(t *testing.T) {
	build := func(n int) func() {
		var hs []*corev3.HeaderValue
		for i := range n {
			hs = append(hs, &corev3.HeaderValue{Key: "x-dup", RawValue: []byte("value-" + strings.Repeat("v", i%7))},
				&corev3.HeaderValue{Key: "x-forwarded-for", RawValue: []byte("192.0.2.1")},
				&corev3.HeaderValue{Key: "x-forwarded-client-cert", RawValue: []byte("Hash=" + fuzzHash)})
		}
		var q strings.Builder
		for i := range n {
			fmt.Fprintf(&q, "p%d=%d&", i, i)
		}
		h := &authv3.AttributeContext_HttpRequest{HeaderMap: &corev3.HeaderMap{Headers: hs}}
		req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{Http: h}}}
		return func() {
			_ = requestHeaders(h)
			_ = headerAmbiguity(h)
			_, _ = clientAddress(req, "x-forwarded-for")
			v, _ := headerList(h, "x-forwarded-client-cert")
			_, _ = xfccThumbprint(v)
			if queryAmbiguity(q.String()) != "" {
				panic("distinct names are not ambiguous")
			}
			_ = queryValues(q.String())
		}
	}
	bytes := func(n int) uint64 {
		f := build(n)
		f()
		var a, b runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&a)
		f()
		runtime.ReadMemStats(&b)
		return b.TotalAlloc - a.TotalAlloc
	}
	small, large := bytes(5000), bytes(10000)
	if ratio := float64(large) / float64(small); ratio > 2.6 {
		t.Fatalf("5,000 repeats allocate %d bytes, 10,000 allocate %d: %.1fx, not linear", small, large, ratio)
	}
}

// TestToken68Table: the table holds RFC 6750's b64token characters and no
// other byte, and padding is only accepted at the end.
func TestToken68Table(t *testing.T) {
	const b64token = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~+/"
	for c := range 256 {
		if want := strings.IndexByte(b64token, byte(c)) >= 0; isToken68("a"+string(rune(c))) != want && c < 0x80 && c != '=' {
			t.Errorf("byte %q: accepted %v, want %v", rune(c), !want, want)
		}
		if c >= 0x80 && isToken68(string([]byte{'a', byte(c)})) {
			t.Errorf("byte %#x accepted", c)
		}
	}
	for s, want := range map[string]bool{"abc==": true, "a.b.c": true, "=": false, "": false, "ab=c": false, "ab c": false, "ab==\x00": false} {
		if isToken68(s) != want {
			t.Errorf("%q: %v, want %v", s, !want, want)
		}
	}
}
