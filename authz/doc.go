// Package authz is the Envoy ext_authz v3 Check server and owns the
// decision: which route a request falls under, where its bearer token is,
// whether the verified token satisfies the route (issuers, scopes, claim
// values), and the CheckResponse: claim headers set with overwrite semantics
// and spoofed copies removed on allow; 401/403 with an RFC 6750
// WWW-Authenticate header on deny; a 503 error response when no decision is
// possible.
//
// Every deny is a response, never a gRPC error, so Envoy's failure_mode_allow
// applies only to real outages. Token checks themselves live in package
// verify.
package authz
