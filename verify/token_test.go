package verify

import (
	"strings"
	"testing"
)

func TestCheckJSON(t *testing.T) {
	for in, wantErr := range map[string]string{
		`{"a":1,"b":[1,{"c":2}],"d":{"e":null}}`: "",
		`{}`:                                     "",
		`{"a":1,"a":2}`:                          "duplicate key",
		`{"a":{"b":1,"b":1}}`:                    "duplicate key",
		`{"a":[{"b":1},{"b":1}]}`:                "", // same key in sibling objects is fine
		`[1]`:                                    "not a JSON object",
		`{"a":1}{"b":2}`:                         "trailing data",
		`{"a":1`:                                 "",
		strings.Repeat(`{"a":`, 20) + `1` + strings.Repeat(`}`, 20): "nested deeper",
		`{"a":1} x`:                 "trailing data",
		"{\"a\":\"\xff\"}":          "invalid JSON",  // not UTF-8
		`{"a\u0000":1,"a\u0000":2}`: "duplicate key", // names compared after unescaping
		`{"\u0061":1,"a":2}`:        "duplicate key",
	} {
		err := checkJSON([]byte(in))
		switch {
		case wantErr == "" && err != nil && in != `{"a":1`:
			t.Errorf("%s: unexpected %v", in, err)
		case wantErr != "" && (err == nil || !strings.Contains(err.Error(), wantErr)):
			t.Errorf("%s: got %v, want %q", in, err, wantErr)
		}
	}
	if checkJSON([]byte(`{"a":1`)) == nil {
		t.Error("truncated JSON accepted")
	}
}

func TestParseJWTStrictBase64(t *testing.T) {
	// header {"alg":"HS256"} and payload {} with non-canonical encodings.
	const h, p = "eyJhbGciOiJIUzI1NiJ9", "e30"
	for name, tok := range map[string]string{
		"padding":       h + "." + p + "=.c2ln",
		"std alphabet":  h + "." + p + ".c2l+",
		"trailing bits": h + "." + "e31" + ".c2ln", // e31 decodes to "{}" with non-zero trailing bits
		"whitespace":    h + ". " + p + ".c2ln",
		"empty header":  "." + p + ".c2ln",
		"empty payload": h + "..c2ln",
		"jwe":           "a.b.c.d.e",
		"four segments": "a.b.c.d",
	} {
		if _, err := parseJWT(tok); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := parseJWT(h + "." + p + ".c2ln"); err != nil {
		t.Errorf("canonical token rejected: %v", err)
	}
}

func TestHasScopeAgreesWithScopes(t *testing.T) {
	for _, c := range []Claims{
		{"scope": "read  write\tadmin"}, {"scp": []any{"a", "b", 3}}, {"scope": "x", "scp": "y z"}, {"scope": ""}, {},
	} {
		for _, want := range []string{"read", "write", "admin", "a", "b", "x", "y", "z", "", "rea"} {
			listed := false
			for _, s := range c.Scopes() {
				listed = listed || s == want
			}
			if c.HasScope(want) != listed {
				t.Errorf("%v: HasScope(%q) = %v, Scopes() lists it: %v", c, want, !listed, listed)
			}
		}
	}
}
