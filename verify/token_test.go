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

// TestHeaderMembersByPresence: the refused members are refused whatever
// their value (null included), a kept member that is not a string is
// named, and a broken header is malformed before anything else is said.
func TestHeaderMembersByPresence(t *testing.T) {
	for hdr, want := range map[string]string{
		`{"alg":"RS256","jku":null}`:            "token_key",
		`{"alg":"RS256","x5c":[]}`:              "token_key",
		`{"alg":"RS256","jwk":{}}`:              "token_key",
		`{"alg":"RS256","x5u":""}`:              "token_key",
		`{"alg":"RS256","crit":null}`:           "crit",
		`{"alg":"RS256","enc":false}`:           "JWE",
		`{"alg":"RS256","b64":true}`:            "b64",
		`{"alg":"RS256","cty":"jwt"}`:           "nested",
		`{"alg":"RS256","kid":7}`:               "kid is not a string",
		`{"alg":null}`:                          "alg is not a string",
		`{"alg":"RS256","typ":{"a":1}}`:         "typ is not a string",
		`{"alg":"none"}`:                        "alg_none",
		`{"alg":"nOnE"}`:                        "alg_none",
		`{"kid":"a"}`:                           "no alg",
		`{"alg":"RS256","alg":"none"}`:          "duplicate key",
		`{"alg":7,"x":[1,}`:                     "invalid JSON",
		`{"alg":"RS256","x":{"y":1,"y":2}}`:     "duplicate key",
		`{"alg":"RS256"}{}`:                     "trailing data",
		`{"alg":"RS256","kid":"k","typ":"JWT"}`: "",
	} {
		tk := &jwt{}
		err := tk.parseHeader(hdr)
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", hdr, err)
		case want != "" && (err == nil || !strings.Contains(AsError(err).Reason+" "+AsError(err).Desc, want)):
			t.Errorf("%s: got %v, want %q", hdr, err, want)
		}
	}
	tk := &jwt{}
	if err := tk.parseHeader(`{"alg":"RS256","kid":"k\u00e9","typ":"at+jwt","extra":[1,{"a":null}]}`); err != nil || tk.alg != "RS256" || tk.kid != "ké" || tk.typ != "at+jwt" {
		t.Errorf("got %+v, %v", tk, err)
	}
}
