package verify

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// FuzzParseJWT: the strict parser never panics, and what it accepts names
// an algorithm other than none, carries none of the headers that let a
// token choose its own key, and has the claims and signature that its
// parts decode to (the parser decodes them into one shared buffer).
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
		parts := strings.Split(raw, ".")
		payload, _ := b64.DecodeString(parts[1])
		sig, _ := b64.DecodeString(parts[2])
		dec := json.NewDecoder(bytes.NewReader(payload))
		dec.UseNumber()
		var want Claims
		if err := dec.Decode(&want); err != nil || !reflect.DeepEqual(tk.claims, want) || !bytes.Equal(tk.signature, sig) {
			t.Fatalf("%q: claims %#v and signature %x, want %#v and %x", raw, tk.claims, tk.signature, want, sig)
		}
	})
}

// FuzzDecodeObject: what the one-pass decoder accepts, encoding/json (with
// UseNumber, as claims were decoded before) reads the same, value for value;
// and the one-pass decoder accepts no top level but an object.
func FuzzDecodeObject(f *testing.F) {
	for _, s := range []string{
		`{"a":1,"b":[1,{"c":2.50e3}],"d":{"e":null},"f":true,"g":"\u00e9\ud83d\ude00"}`,
		`{}`, `{"a":1,"a":2}`, `[1]`, `{"a":-0}`, `{"a":[]}`, `{"a":{}}`, `{"a":1} `,
		`{"a":"\u0000"}`, `{"a":1e400}`, `{"a":"x\/y"}`, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeObject(b)
		if err != nil {
			return
		}
		if len(bytes.TrimSpace(b)) == 0 || bytes.TrimSpace(b)[0] != '{' {
			t.Fatalf("accepted a top level that is not an object: %q", b)
		}
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.UseNumber()
		var want Claims
		if err := dec.Decode(&want); err != nil {
			t.Fatalf("accepted %q, which encoding/json refuses: %v", b, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%q: decoded %#v, encoding/json %#v", b, got, want)
		}
	})
}
