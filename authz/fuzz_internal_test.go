package authz

import (
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
)

// FuzzCredentials: token extraction never panics, and whatever it returns
// as a token is one b64token within the size limit, from a request with one
// credential.
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
		if tok == "" || len(tok) > 64 || !isToken68(tok) || strings.Contains(auth, ",") {
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
