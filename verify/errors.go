package verify

import (
	"errors"
	"fmt"
)

// Kind classifies a verification failure so callers can map it to a response
// without parsing messages.
type Kind int

const (
	// Invalid: the token is malformed, badly signed, expired or otherwise not
	// acceptable. Maps to 401 invalid_token.
	Invalid Kind = iota + 1
	// Unavailable: no decision is possible because a dependency (the issuer's
	// keys or introspection endpoint) cannot be reached and nothing usable is
	// cached. Maps to an error response, never to an allow.
	Unavailable
)

func (k Kind) String() string {
	switch k {
	case Invalid:
		return "invalid"
	case Unavailable:
		return "unavailable"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Error is the error type returned by verification. Desc is safe to show to a
// client: it never contains the token or key material.
type Error struct {
	Kind Kind
	// Reason is a short, stable identifier usable as a metric label, such as
	// "expired" or "unknown_kid".
	Reason string
	Desc   string
	// Issuer names the issuer concerned, when one was chosen.
	Issuer string
	Err    error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return "verify: " + e.Desc + ": " + e.Err.Error()
	}
	return "verify: " + e.Desc
}

func (e *Error) Unwrap() error { return e.Err }

// ReasonThrottled is the Reason of an Unavailable error for a provider call
// refused by the per-pod call budget: expected under a flood, so callers
// count it rather than log it.
const ReasonThrottled = "throttled"

func invalid(reason, desc string) *Error {
	return &Error{Kind: Invalid, Reason: reason, Desc: desc}
}

func unavailable(desc string, err error) *Error {
	return &Error{Kind: Unavailable, Reason: "unavailable", Desc: desc, Err: err}
}

// AsError returns err as *Error. An error of any other type is reported as
// Unavailable, so an unexpected failure can never be mistaken for a verdict.
func AsError(err error) *Error {
	var ve *Error
	if errors.As(err, &ve) {
		return ve
	}
	return unavailable("verification failed", err)
}
