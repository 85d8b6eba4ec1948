package authz

import (
	"strings"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
)

// FuzzCredentials: token extraction never panics, and whatever it returns
// as a token is one b64token within the size limit, from a request with one
// credential.
func FuzzCredentials(f *testing.F) {
	for _, s := range []string{"Bearer abc.def.ghi", "bearer  x", "Basic dXNlcjpw", "Bearer a,Bearer b", "Bearer ", "Bearer a=b", "", "Bearer \x00"} {
		f.Add(s, "/p?access_token=x")
		f.Add(s, "/p")
	}
	f.Fuzz(func(t *testing.T, auth, path string) {
		h := &authv3.AttributeContext_HttpRequest{Path: path, Headers: map[string]string{"authorization": auth}}
		tok, d := credentials(h, path, 64)
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

// FuzzRequestPath: the path check never panics, and a path it accepts has
// no dot segment or encoded separator in any spelling.
func FuzzRequestPath(f *testing.F) {
	for _, s := range []string{"/a/b", "/a/../b", "/a/%2e%2e/b", "/a%2fb", `/a\b`, "/a/./b", "/a?x=../y", "", "/%", "/%zz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		p, ok := requestPath(raw)
		if !ok {
			return
		}
		for seg := range strings.SplitSeq(p, "/") {
			l := strings.ToLower(seg)
			if seg == "." || seg == ".." || strings.Contains(l, "%2f") || strings.Contains(l, "%5c") ||
				l == "%2e" || l == "%2e%2e" || l == ".%2e" || l == "%2e." || strings.Contains(seg, `\`) {
				t.Fatalf("accepted %q (segment %q)", raw, seg)
			}
		}
	})
}
