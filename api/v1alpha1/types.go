package v1alpha1

import (
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TokenPolicy is a team's authorization policy for the hosts it owns: the
// file config's routes, selected by the request's host.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,shortName=tp,categories=tokenauthz
// +kubebuilder:printcolumn:name="Hosts",type=string,JSONPath=`.spec.hosts`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Reason",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].reason`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type TokenPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   TokenPolicySpec `json:"spec"`
	Status Status          `json:"status,omitempty"`
}

// TokenPolicySpec is what a policy asks of requests to its hosts.
type TokenPolicySpec struct {
	// Hosts the policy serves: exact DNS names or "*.suffix", matched
	// against the request's host without port. A namespace may claim only
	// hosts the platform delegated to it.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=64
	// +listType=set
	// +kubebuilder:validation:items:MaxLength=253
	// +kubebuilder:validation:items:Pattern=`^(\*\.)?[a-z0-9]([-a-z0-9_]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9_]*[a-z0-9])?)*$`
	Hosts []string `json:"hosts"`
	// Issuers whose tokens the routes accept (unless a route names its
	// own): a TokenIssuer in this namespace, else a ClusterTokenIssuer, else
	// an issuer of the file config, by name.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=32
	// +listType=set
	Issuers []string `json:"issuers"`
	// Routes are matched in order, as the file config's are.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=256
	Routes []Route `json:"routes"`
}

// Route is one route, with the file config's route keys.
//
// +kubebuilder:validation:XValidation:rule="!has(self.anonymous) || !self.anonymous || !has(self.allow_missing) || !self.allow_missing",message="anonymous or allow_missing, not both"
type Route struct {
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$`
	Name string `json:"name"`
	// +optional
	Match Match `json:"match,omitempty"`
	// +optional
	Anonymous bool `json:"anonymous,omitempty"`
	// +optional
	AllowMissing bool `json:"allow_missing,omitempty"`
	// Issuers accepted on this route; default the policy's.
	// +optional
	// +listType=set
	Issuers []string `json:"issuers,omitempty"`
	// +optional
	Scopes []string `json:"scopes,omitempty"`
	// Claims: a claim path to a value or a list of values.
	// +optional
	Claims map[string]apiextensionsv1.JSON `json:"claims,omitempty"`
	// When: CEL conditions, each an expression or { cel, message }.
	// +optional
	// +kubebuilder:validation:MaxItems=32
	When []apiextensionsv1.JSON `json:"when,omitempty"`
	// Headers: a claim path, a list of claim paths, or { cel }.
	// +optional
	Headers map[string]apiextensionsv1.JSON `json:"headers,omitempty"`
	// +optional
	// +kubebuilder:validation:Enum=opaque;always;never
	Introspect string `json:"introspect,omitempty"`
	// +optional
	// +kubebuilder:validation:Enum=if_bound;required;none
	SenderConstraint string `json:"sender_constraint,omitempty"`
	// +optional
	Userinfo bool `json:"userinfo,omitempty"`
	// Mode: enforce (default) or dry_run (evaluated and reported, then allowed).
	// +optional
	// +kubebuilder:validation:Enum=enforce;dry_run
	Mode string `json:"mode,omitempty"`
}

// Match selects requests by path and method (the policy's hosts select by
// host).
//
// +kubebuilder:validation:XValidation:rule="!has(self.path) || !has(self.path_prefix)",message="set path or path_prefix, not both"
type Match struct {
	// +optional
	// +kubebuilder:validation:Pattern=`^/`
	// +kubebuilder:validation:MaxLength=1024
	Path string `json:"path,omitempty"`
	// +optional
	// +kubebuilder:validation:Pattern=`^/`
	// +kubebuilder:validation:MaxLength=1024
	PathPrefix string `json:"path_prefix,omitempty"`
	// +optional
	// +listType=set
	// +kubebuilder:validation:items:Pattern=`^[A-Z][A-Z0-9-]*$`
	Methods []string `json:"methods,omitempty"`
}

// Status is what the pods accepted of a resource.
type Status struct {
	// ObservedGeneration is the generation the conditions describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Accepted (True, or False with the reason: HostConflict,
	// HostNotDelegated, InvalidRoute, IssuerNotFound, InvalidIssuer,
	// IssuerConflict).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// TokenPolicyList is a list of TokenPolicy.
//
// +kubebuilder:object:root=true
type TokenPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []TokenPolicy `json:"items"`
}

// TokenIssuer is a team's own identity provider, usable by the policies of
// its namespace. Public keys only (a key set URL, discovery or inline
// keys): issuers that need secrets are the platform's ClusterTokenIssuers.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,shortName=ti,categories=tokenauthz
// +kubebuilder:printcolumn:name="Issuer",type=string,JSONPath=`.spec.issuer`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type TokenIssuer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   PublicIssuerSpec `json:"spec"`
	Status Status           `json:"status,omitempty"`
}

// TokenIssuerList is a list of TokenIssuer.
//
// +kubebuilder:object:root=true
type TokenIssuerList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []TokenIssuer `json:"items"`
}

// ClusterTokenIssuer is one of the platform's identity providers, usable by
// every namespace's policies. Its secret files (introspection client
// secrets, HMAC secrets) are mounted into the pods by the platform.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=cti,categories=tokenauthz
// +kubebuilder:printcolumn:name="Issuer",type=string,JSONPath=`.spec.issuer`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type ClusterTokenIssuer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   IssuerSpec `json:"spec"`
	Status Status     `json:"status,omitempty"`
}

// ClusterTokenIssuerList is a list of ClusterTokenIssuer.
//
// +kubebuilder:object:root=true
type ClusterTokenIssuerList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ClusterTokenIssuer `json:"items"`
}

// PublicIssuerSpec is the file config's issuer schema without secrets or
// files: what a namespace may configure.
//
// +kubebuilder:validation:XValidation:rule="has(self.jwks_uri) || (has(self.discovery) && self.discovery) || has(self.jwks)",message="one key source: jwks_uri, discovery or jwks"
// +kubebuilder:validation:XValidation:rule="has(self.issuer) != has(self.issuer_template)",message="set issuer or issuer_template"
type PublicIssuerSpec struct {
	// Issuer is the exact iss value.
	// +optional
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=2048
	// +kubebuilder:validation:Pattern=`^https://`
	Issuer string `json:"issuer,omitempty"`
	// IssuerTemplate is one issuer per tenant: an https URL with one
	// {tenant} placeholder in its path or as a host label.
	// +optional
	// +kubebuilder:validation:MaxLength=2048
	// +kubebuilder:validation:Pattern=`^https://`
	IssuerTemplate string `json:"issuer_template,omitempty"`
	// Tenants are the accepted values of {tenant} (a resource lists them,
	// or accepts any; a file is for the file config only).
	// +optional
	Tenants *Tenants `json:"tenants,omitempty"`
	// +optional
	// +kubebuilder:validation:MaxLength=256
	TenantPattern string `json:"tenant_pattern,omitempty"`
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxTenantsCached int `json:"max_tenants_cached,omitempty"`
	// +optional
	// +kubebuilder:validation:Minimum=1
	MaxDiscoveriesPerSecond int `json:"max_discoveries_per_second,omitempty"`
	// +optional
	Audiences []string `json:"audiences,omitempty"`
	// +optional
	AllowAnyAudience bool `json:"allow_any_audience,omitempty"`
	// +optional
	// +kubebuilder:validation:Pattern=`^https://`
	JWKSURI string `json:"jwks_uri,omitempty"`
	// +optional
	Discovery bool `json:"discovery,omitempty"`
	// +optional
	DiscoveryAllowedHosts []string `json:"discovery_allowed_hosts,omitempty"`
	// JWKS is an inline key set (JSON).
	// +optional
	JWKS string `json:"jwks,omitempty"`
	// +optional
	Algorithms []string `json:"algorithms,omitempty"`
	// +optional
	Leeway *metav1.Duration `json:"leeway,omitempty"`
	// +optional
	RequiredClaims []string `json:"required_claims,omitempty"`
	// +optional
	TokenType string `json:"token_type,omitempty"`
	// +optional
	AllowMissingExp bool `json:"allow_missing_exp,omitempty"`
	// +optional
	Keys *Keys `json:"keys,omitempty"`
	// +optional
	DPoP *DPoP `json:"dpop,omitempty"`
}

// Tenants lists an issuer template's accepted tenants: allow, or any.
//
// +kubebuilder:validation:XValidation:rule="has(self.allow) != (has(self.any) && self.any)",message="set allow or any: true"
type Tenants struct {
	// +optional
	// +kubebuilder:validation:MaxItems=10000
	Allow []string `json:"allow,omitempty"`
	// +optional
	Any bool `json:"any,omitempty"`
}

// IssuerSpec is the file config's whole issuer schema (the name is the
// resource's).
type IssuerSpec struct {
	PublicIssuerSpec `json:",inline"`
	// +optional
	JWKSFile string `json:"jwks_file,omitempty"`
	// +optional
	HMACSecretFile string `json:"hmac_secret_file,omitempty"`
	// +optional
	HMACSecretEnv string `json:"hmac_secret_env,omitempty"`
	// +optional
	Introspection *apiextensionsv1.JSON `json:"introspection,omitempty"`
	// +optional
	Userinfo *apiextensionsv1.JSON `json:"userinfo,omitempty"`
}

// Keys tunes key-set fetching.
type Keys struct {
	// +optional
	Timeout *metav1.Duration `json:"timeout,omitempty"`
	// +optional
	RefreshInterval *metav1.Duration `json:"refresh_interval,omitempty"`
	// +optional
	MinRefreshInterval *metav1.Duration `json:"min_refresh_interval,omitempty"`
	// +optional
	MaxRefreshInterval *metav1.Duration `json:"max_refresh_interval,omitempty"`
	// +optional
	MaxStale *metav1.Duration `json:"max_stale,omitempty"`
	// +optional
	MaxResponseBytes int64 `json:"max_response_bytes,omitempty"`
	// +optional
	MaxKeys int `json:"max_keys,omitempty"`
}

// DPoP turns on DPoP proofs for the issuer's tokens.
type DPoP struct {
	// +optional
	Algorithms []string `json:"algorithms,omitempty"`
	// +optional
	MaxAge *metav1.Duration `json:"max_age,omitempty"`
	// +optional
	Nonce bool `json:"nonce,omitempty"`
}
