package verify

import (
	"strings"
	"testing"
)

// FuzzParseJWT: the strict parser never panics, and what it accepts names
// an algorithm other than none and carries none of the headers that let a
// token choose its own key.
func FuzzParseJWT(f *testing.F) {
	for _, s := range []string{
		"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
		"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
		"eyJhbGciOiJSUzI1NiIsImp3ayI6e319.e30.c2ln",
		"eyJhbGciOiJSUzI1NiIsImFsZyI6Im5vbmUifQ.e30.c2ln",
		"a.b.c", "..", "a.b.c.d.e", "eyJ9.eyJ9.eyJ9",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		tk, err := parseJWT(raw)
		if err != nil {
			if AsError(err).Kind != Invalid {
				t.Fatalf("a parse failure that is not Invalid: %v", err)
			}
			return
		}
		if strings.EqualFold(tk.alg, "none") || tk.alg == "" || len(tk.signature) == 0 || !strings.HasPrefix(raw, tk.signingInput+".") {
			t.Fatalf("accepted %q: alg %q", raw, tk.alg)
		}
	})
}
