// Package deploy holds the deployment material: Kubernetes and Istio
// manifests, and the demo configuration that the binary embeds so that
// `tokenauthz serve` works with no set-up.
package deploy

import _ "embed"

// DemoConfig is demo/config.yaml. It trusts only the demo issuer.
//
//go:embed demo/config.yaml
var DemoConfig []byte

// DemoSigningKey is the demo issuer's private key (a JWK). It is public by
// design, so tokens it signs prove nothing outside the demo.
//
//go:embed demo/signing-key.jwk
var DemoSigningKey []byte
