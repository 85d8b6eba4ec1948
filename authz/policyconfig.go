package authz

import (
	"errors"
	"fmt"
)

// WhenRule is a CEL condition a request must meet. In YAML, the expression
// as a string, or { cel: EXPR, message: TEXT }.
type WhenRule struct {
	CEL string `yaml:"cel"`
	// Message is the deny's description (the expression when empty).
	Message string `yaml:"message,omitempty"`
}

// UnmarshalYAML takes the string form or the mapping form; the decoder's
// strictness (unknown keys are errors) carries over.
func (w *WhenRule) UnmarshalYAML(unmarshal func(any) error) error {
	var s string
	if unmarshal(&s) == nil {
		*w = WhenRule{CEL: s}
		return nil
	}
	type plain WhenRule
	var p plain
	if err := unmarshal(&p); err != nil {
		return fmt.Errorf("a when entry is a CEL expression or { cel: EXPR, message: TEXT }: %w", err)
	}
	*w = WhenRule(p)
	return nil
}

// MarshalYAML writes the short form when there is no message.
func (w WhenRule) MarshalYAML() (any, error) {
	if w.Message == "" {
		return w.CEL, nil
	}
	type plain WhenRule
	return plain(w), nil
}

// HeaderSource is where an upstream header's value comes from: a claim path
// (a string), claim paths tried in order (a list: the first present wins),
// or a CEL expression ({ cel: EXPR }). In a route's headers, null (a nil
// *HeaderSource) turns a top-level header off for that route.
type HeaderSource struct {
	Claims []string
	CEL    string
}

// Claim is the common case: one claim path.
func Claim(path string) *HeaderSource { return &HeaderSource{Claims: []string{path}} }

// ClaimHeaders builds a headers map of single claim paths.
func ClaimHeaders(m map[string]string) map[string]*HeaderSource {
	out := make(map[string]*HeaderSource, len(m))
	for h, c := range m {
		out[h] = Claim(c)
	}
	return out
}

func (h *HeaderSource) UnmarshalYAML(unmarshal func(any) error) error {
	var s string
	if unmarshal(&s) == nil {
		*h = HeaderSource{Claims: []string{s}}
		return nil
	}
	var list []string
	if unmarshal(&list) == nil {
		*h = HeaderSource{Claims: list}
		return nil
	}
	var e struct {
		CEL string `yaml:"cel"`
	}
	if err := unmarshal(&e); err != nil || e.CEL == "" {
		return errors.New("a header is a claim path, a list of claim paths, { cel: EXPR } or null")
	}
	*h = HeaderSource{CEL: e.CEL}
	return nil
}

func (h HeaderSource) MarshalYAML() (any, error) {
	switch {
	case h.CEL != "":
		return map[string]string{"cel": h.CEL}, nil
	case len(h.Claims) == 1:
		return h.Claims[0], nil
	}
	return h.Claims, nil
}
