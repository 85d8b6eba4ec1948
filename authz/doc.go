// Package authz is the Envoy ext_authz v3 Check server and owns the
// decision: the one canonical view of a request (or the 400 that refuses a
// request without one), which route it falls under, where its bearer token
// is, whether the verified token satisfies the route (issuers, scopes, claim
// values, CEL conditions), and the CheckResponse: the route's claim headers
// set with overwrite semantics and spoofed copies removed on allow; 401/403
// with an RFC 6750 WWW-Authenticate header on deny; a 503 error response
// when no decision is possible.
//
// The decision is a fixed sequence of named steps (steps.go); Explain
// watches the same steps through an observer. Every deny is a response,
// never a gRPC error, and every response marshals, so Envoy's
// failure_mode_allow applies only to real outages. Token checks themselves
// live in package verify.
package authz
