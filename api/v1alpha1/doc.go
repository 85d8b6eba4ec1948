// Package v1alpha1 holds the Kubernetes API types of tokenauthz (API group
// tokenauthz.io): TokenPolicy, a team's routes for the hosts delegated to
// its namespace; TokenIssuer, a team's own public-key identity provider;
// and ClusterTokenIssuer, the platform's identity providers. Their specs
// carry the file config's route and issuer schemas under the same key
// names, so a route or issuer moves between the file and a resource
// unchanged. The CRD YAML (deploy/kubernetes/crds) and zz_generated
// deepcopy code are generated from these types by controller-gen.
//
// +kubebuilder:object:generate=true
// +groupName=tokenauthz.io
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of these types.
var GroupVersion = schema.GroupVersion{Group: "tokenauthz.io", Version: "v1alpha1"}

// Resources, as the API server names them.
var (
	TokenPolicies       = GroupVersion.WithResource("tokenpolicies")
	TokenIssuers        = GroupVersion.WithResource("tokenissuers")
	ClusterTokenIssuers = GroupVersion.WithResource("clustertokenissuers")
)

// AddToScheme registers the types with a scheme.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &TokenPolicy{}, &TokenPolicyList{}, &TokenIssuer{}, &TokenIssuerList{},
		&ClusterTokenIssuer{}, &ClusterTokenIssuerList{})
	return nil
}
