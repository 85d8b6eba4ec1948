package kube

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"sigs.k8s.io/yaml"

	yamlv3 "go.yaml.in/yaml/v3"

	"github.com/tokenauthz/tokenauthz/api/v1alpha1"
	"github.com/tokenauthz/tokenauthz/authz"
)

// ValidateDocuments checks resource files the way the pods will, for CI
// before kubectl apply: every TokenPolicy, TokenIssuer and
// ClusterTokenIssuer in docs (YAML, several documents a file) is decoded
// strictly and built against file (the platform's config: its issuers,
// headers and host delegation). Objects without a namespace are in ns. It
// returns one line per problem, naming the object; none means every object
// would be accepted.
func ValidateDocuments(file *authz.Config, kc *Config, ns string, docs map[string][]byte) []string {
	var objs Objects
	var problems []string
	for name, data := range docs {
		dec := yamlv3.NewDecoder(bytes.NewReader(data))
		for i := 0; ; i++ {
			var node yamlv3.Node
			err := dec.Decode(&node)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: %v", name, err))
				break
			}
			raw, err := yamlv3.Marshal(&node)
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: document %d: %v", name, i+1, err))
				continue
			}
			var head struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
			}
			_ = yaml.Unmarshal(raw, &head)
			if head.APIVersion != v1alpha1.GroupVersion.String() {
				continue // not ours: another resource of the same file
			}
			where := fmt.Sprintf("%s: document %d (%s)", name, i+1, head.Kind)
			var err2 error
			switch head.Kind {
			case "TokenPolicy":
				var tp v1alpha1.TokenPolicy
				if err2 = yaml.UnmarshalStrict(raw, &tp); err2 == nil {
					if tp.Namespace == "" {
						tp.Namespace = ns
					}
					tp.UID = typesUID(where)
					objs.Policies = append(objs.Policies, &tp)
				}
			case "TokenIssuer":
				var ti v1alpha1.TokenIssuer
				if err2 = yaml.UnmarshalStrict(raw, &ti); err2 == nil {
					if ti.Namespace == "" {
						ti.Namespace = ns
					}
					ti.UID = typesUID(where)
					objs.Issuers = append(objs.Issuers, &ti)
				}
			case "ClusterTokenIssuer":
				var ci v1alpha1.ClusterTokenIssuer
				if err2 = yaml.UnmarshalStrict(raw, &ci); err2 == nil {
					ci.UID = typesUID(where)
					objs.ClusterIssuers = append(objs.ClusterIssuers, &ci)
				}
			default:
				err2 = fmt.Errorf("no kind %q in %s", head.Kind, v1alpha1.GroupVersion)
			}
			if err2 != nil {
				problems = append(problems, fmt.Sprintf("%s: %v", where, err2))
			}
		}
	}
	snap := NewBuilder().Build(file, kc, objs)
	for _, st := range snap.Status {
		if !st.Accepted {
			name := st.Name
			if st.Namespace != "" {
				name = st.Namespace + "/" + name
			}
			problems = append(problems, fmt.Sprintf("%s %s: %s: %s", st.Resource.Resource, name, st.Reason, st.Message))
		}
	}
	return problems
}
