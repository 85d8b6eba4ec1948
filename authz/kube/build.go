package kube

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tokenauthz/tokenauthz/api/v1alpha1"
	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
)

// Reasons of the Accepted condition.
const (
	ReasonAccepted         = "Accepted"
	ReasonInvalidRoute     = "InvalidRoute"
	ReasonIssuerNotFound   = "IssuerNotFound"
	ReasonHostNotDelegated = "HostNotDelegated"
	ReasonHostConflict     = "HostConflict"
	ReasonInvalidIssuer    = "InvalidIssuer"
	ReasonIssuerConflict   = "IssuerConflict"
)

// Objects are the resources a build reads.
type Objects struct {
	Policies       []*v1alpha1.TokenPolicy
	Issuers        []*v1alpha1.TokenIssuer
	ClusterIssuers []*v1alpha1.ClusterTokenIssuer
}

// Snapshot is a build's result: what the core assembles with the file
// config, and the status every resource should have.
type Snapshot struct {
	// Issuers are the accepted issuer resources, named as routes name them:
	// a ClusterTokenIssuer by its name, a TokenIssuer as namespace/name.
	Issuers []verify.IssuerConfig
	Hosts   []*authz.CompiledHostPolicy
	Status  []ObjectStatus
}

// ObjectStatus is the Accepted condition one resource should carry.
type ObjectStatus struct {
	Resource   schema.GroupVersionResource
	Namespace  string
	Name       string
	UID        types.UID
	Generation int64
	Accepted   bool
	Reason     string
	Message    string
}

// Builder turns objects into a Snapshot. It remembers each policy's last
// accepted generation, so an invalid update keeps the previous one in
// force (and says why in status), and it compiles a generation once.
type Builder struct {
	last map[types.UID]*compiled // the last accepted generation, by policy
	seen map[types.UID]*compiled // the current generation's compile, if it compiled
}

type compiled struct {
	generation int64
	context    string // the issuers and top-level settings it compiled against
	spec       v1alpha1.TokenPolicySpec
	policy     *authz.CompiledHostPolicy
	problems   []string
	reason     string
}

// NewBuilder returns a Builder with no history.
func NewBuilder() *Builder {
	return &Builder{last: map[types.UID]*compiled{}, seen: map[types.UID]*compiled{}}
}

// Build decides, from file (the file config's decision settings and
// issuers) and the objects, which policies and issuers are in force.
func (b *Builder) Build(file *authz.Config, kc *Config, objs Objects) *Snapshot {
	snap := &Snapshot{}
	top := *file
	top.ResourceIssuers = nil
	names := map[string]bool{}
	for _, is := range file.Issuers {
		names[is.Name] = true
	}
	// Platform issuers, oldest first; a name the file has is the file's.
	cis := slices.Clone(objs.ClusterIssuers)
	slices.SortFunc(cis, func(a, b *v1alpha1.ClusterTokenIssuer) int { return olderFirst(&a.ObjectMeta, &b.ObjectMeta) })
	for _, ci := range cis {
		st := ObjectStatus{Resource: v1alpha1.ClusterTokenIssuers, Name: ci.Name, UID: ci.UID, Generation: ci.Generation}
		cfg, err := issuerConfig(ci.Name, &ci.Spec)
		switch {
		case names[ci.Name]:
			st.Reason, st.Message = ReasonIssuerConflict, fmt.Sprintf("the file config has an issuer named %q", ci.Name)
		case err != nil:
			st.Reason, st.Message = ReasonInvalidIssuer, err.Error()
		default:
			if p := cfg.Validate(); len(p) > 0 {
				st.Reason, st.Message = ReasonInvalidIssuer, strings.Join(p, "; ")
			} else {
				st.Accepted, st.Reason, st.Message = true, ReasonAccepted, "accepted"
				top.ResourceIssuers = append(top.ResourceIssuers, cfg)
				snap.Issuers = append(snap.Issuers, cfg)
				names[ci.Name] = true
			}
		}
		snap.Status = append(snap.Status, st)
	}
	// Team issuers, named namespace/name, so no team can shadow another's.
	tis := slices.Clone(objs.Issuers)
	slices.SortFunc(tis, func(a, b *v1alpha1.TokenIssuer) int { return olderFirst(&a.ObjectMeta, &b.ObjectMeta) })
	for _, ti := range tis {
		name := ti.Namespace + "/" + ti.Name
		st := ObjectStatus{Resource: v1alpha1.TokenIssuers, Namespace: ti.Namespace, Name: ti.Name, UID: ti.UID, Generation: ti.Generation}
		spec := v1alpha1.IssuerSpec{PublicIssuerSpec: ti.Spec}
		cfg, err := issuerConfig(name, &spec)
		if err == nil {
			if p := cfg.Validate(); len(p) > 0 {
				err = fmt.Errorf("%s", strings.Join(p, "; "))
			} else if cfg.Keys.AllowHTTP {
				err = fmt.Errorf("keys.allow_http: a namespace's issuer fetches keys over https only")
			}
		}
		if err != nil {
			st.Reason, st.Message = ReasonInvalidIssuer, err.Error()
		} else {
			st.Accepted, st.Reason, st.Message = true, ReasonAccepted, "accepted"
			top.ResourceIssuers = append(top.ResourceIssuers, cfg)
			snap.Issuers = append(snap.Issuers, cfg)
			names[name] = true
		}
		snap.Status = append(snap.Status, st)
	}
	// The context a policy compiles against: a change to any issuer or to
	// the file's decision settings recompiles every policy.
	ctxKey := contextKey(&top)

	pols := slices.Clone(objs.Policies)
	slices.SortFunc(pols, func(a, b *v1alpha1.TokenPolicy) int { return olderFirst(&a.ObjectMeta, &b.ObjectMeta) })
	claimed := map[string]string{} // host → policy (namespace/name), oldest first
	live := map[types.UID]bool{}
	for _, tp := range pols {
		live[tp.UID] = true
		st := ObjectStatus{Resource: v1alpha1.TokenPolicies, Namespace: tp.Namespace, Name: tp.Name, UID: tp.UID, Generation: tp.Generation}
		cur := b.compile(&top, kc, tp, tp.Spec, tp.Generation, ctxKey)
		use := cur
		if cur.policy == nil || hostConflict(cur.spec.Hosts, claimed) != "" {
			// The current generation is refused: the last accepted one
			// stays in force if it still holds.
			if last := b.last[tp.UID]; last != nil && last.generation != tp.Generation {
				again := b.compile(&top, kc, tp, last.spec, last.generation, ctxKey)
				if again.policy != nil && hostConflict(again.spec.Hosts, claimed) == "" {
					use = again
				} else {
					use = nil
				}
			} else {
				use = nil
			}
		}
		switch {
		case cur.policy == nil:
			st.Reason, st.Message = cur.reason, strings.Join(cur.problems, "; ")
		case hostConflict(cur.spec.Hosts, claimed) != "":
			h := hostConflict(cur.spec.Hosts, claimed)
			st.Reason, st.Message = ReasonHostConflict, fmt.Sprintf("host %q belongs to the older policy %s", h, claimed[h])
		default:
			st.Accepted, st.Reason, st.Message = true, ReasonAccepted, fmt.Sprintf("serving %d hosts with %d routes", len(cur.spec.Hosts), len(cur.spec.Routes))
		}
		if !st.Accepted && use != nil {
			st.Message += fmt.Sprintf(" (generation %d stays in force)", use.generation)
		}
		if use != nil {
			for _, h := range use.spec.Hosts {
				claimed[h] = tp.Namespace + "/" + tp.Name
			}
			snap.Hosts = append(snap.Hosts, use.policy)
			if use == cur {
				b.last[tp.UID] = cur
			}
		}
		snap.Status = append(snap.Status, st)
	}
	for uid := range b.last {
		if !live[uid] {
			delete(b.last, uid) // deleted: its hosts have no route now
		}
	}
	for uid := range b.seen {
		if !live[uid] {
			delete(b.seen, uid)
		}
	}
	return snap
}

// compile checks and compiles one generation of a policy, once per
// generation and context.
func (b *Builder) compile(top *authz.Config, kc *Config, tp *v1alpha1.TokenPolicy, spec v1alpha1.TokenPolicySpec, gen int64, ctxKey string) *compiled {
	key := tp.UID
	if gen != tp.Generation {
		key = types.UID(string(tp.UID) + "/last")
	}
	if c := b.seen[key]; c != nil && c.generation == gen && c.context == ctxKey {
		return c
	}
	c := &compiled{generation: gen, context: ctxKey, spec: spec}
	b.seen[key] = c
	for _, h := range spec.Hosts {
		if !kc.delegated(tp.Namespace, h) {
			c.reason = ReasonHostNotDelegated
			c.problems = append(c.problems, fmt.Sprintf("host %q is not delegated to namespace %s (its own are *.%s.svc.cluster.local and *.%s.svc; the platform delegates more in kubernetes.host_delegation)",
				h, tp.Namespace, tp.Namespace, tp.Namespace))
		}
	}
	if c.reason != "" {
		return c
	}
	resolve := func(name string) (string, bool) {
		all := top.AllIssuers()
		for _, n := range []string{tp.Namespace + "/" + name, name} {
			for _, is := range all {
				if is.Name == n && (n == name || strings.HasPrefix(n, tp.Namespace+"/")) {
					return n, true
				}
			}
		}
		return "", false
	}
	hp := authz.HostPolicy{Name: tp.Namespace + "/" + tp.Name, Hosts: spec.Hosts}
	for _, n := range spec.Issuers {
		full, ok := resolve(n)
		if !ok || strings.Contains(n, "/") {
			c.reason = ReasonIssuerNotFound
			c.problems = append(c.problems, fmt.Sprintf("issuer %q: no TokenIssuer in namespace %s, ClusterTokenIssuer or file issuer of that name is accepted", n, tp.Namespace))
			continue
		}
		hp.Issuers = append(hp.Issuers, full)
	}
	for i, r := range spec.Routes {
		rc, err := routeConfig(&r)
		if err != nil {
			c.reason = ReasonInvalidRoute
			c.problems = append(c.problems, fmt.Sprintf("routes[%d]: %v", i, err))
			continue
		}
		for j, n := range rc.Issuers {
			full, ok := resolve(n)
			if !ok || strings.Contains(n, "/") {
				c.reason = ReasonIssuerNotFound
				c.problems = append(c.problems, fmt.Sprintf("routes[%d].issuers[%d]: no issuer %q is accepted", i, j, n))
				continue
			}
			rc.Issuers[j] = full
		}
		hp.Routes = append(hp.Routes, rc)
	}
	if c.reason != "" {
		return c
	}
	policy, problems := authz.CompileHostPolicy(top, hp)
	if len(problems) > 0 {
		c.reason, c.problems = ReasonInvalidRoute, problems
		return c
	}
	c.policy = policy
	return c
}

// Assemble is the Config the core runs: the file's, with the snapshot's
// issuers and host policies.
func Assemble(file *authz.Config, snap *Snapshot) *authz.Config {
	c := *file
	c.RoutesFromResources = true
	if snap != nil {
		c.ResourceIssuers, c.Hosts = snap.Issuers, snap.Hosts
	}
	return &c
}

// hostConflict is the first of hosts an older policy claimed ("" if none).
func hostConflict(hosts []string, claimed map[string]string) string {
	for _, h := range hosts {
		if _, taken := claimed[h]; taken {
			return h
		}
	}
	return ""
}

// olderFirst orders by creation time, then namespace and name, so every
// pod decides conflicts alike.
func olderFirst(a, b *metav1.ObjectMeta) int {
	if c := a.CreationTimestamp.Time.Compare(b.CreationTimestamp.Time); c != 0 {
		return c
	}
	if c := strings.Compare(a.Namespace, b.Namespace); c != 0 {
		return c
	}
	return strings.Compare(a.Name, b.Name)
}

// contextKey names what policies compile against: the issuers in force and
// the file's top-level headers.
func contextKey(top *authz.Config) string {
	b, _ := json.Marshal(struct {
		I any
		H any
	}{top.AllIssuers(), top.Headers})
	return string(b)
}

// routeConfig reads a resource's route as the file config reads a route:
// the same keys, the same strict decoding (unknown keys are errors).
func routeConfig(r *v1alpha1.Route) (authz.RouteConfig, error) {
	var rc authz.RouteConfig
	err := viaYAML(r, &rc)
	return rc, err
}

// issuerConfig reads an issuer resource's spec as the file reads an issuer.
func issuerConfig(name string, spec *v1alpha1.IssuerSpec) (verify.IssuerConfig, error) {
	var cfg verify.IssuerConfig
	if err := viaYAML(spec, &cfg); err != nil {
		return cfg, err
	}
	cfg.Name = name
	return cfg, nil
}

// viaYAML converts an API object to its file-config type through JSON
// (which is YAML), with the file's decoder: the API types use the file's
// key names.
func viaYAML(in, out any) error {
	j, err := json.Marshal(in)
	if err != nil {
		return err
	}
	dec := yaml.NewDecoder(bytes.NewReader(j))
	dec.KnownFields(true)
	if err := dec.Decode(out); err != nil {
		return fmt.Errorf("%s", strings.TrimPrefix(err.Error(), "yaml: "))
	}
	return nil
}

func typesUID(s string) types.UID { return types.UID(s) }
