// Package kube is the Kubernetes policy source: it watches TokenPolicy,
// TokenIssuer and ClusterTokenIssuer resources (api/v1alpha1) with
// client-go informers, decides which policies are accepted (host
// delegation, host conflicts, issuers, the same route checks as the file),
// compiles each accepted policy once, hands the core a Snapshot to
// assemble with the file config, and writes each resource's status.
//
// Every pod runs the same deterministic build from the same objects and
// writes a status only when it differs from the stored one, with the
// object's resourceVersion (optimistic concurrency): the first pod's write
// wins, the others then find nothing to change. So there is no leader,
// and pods never fight over status.
package kube

import (
	"fmt"
	"path"
	"strings"
)

// Config is the file config's kubernetes section: whether policies are
// read from the cluster, from which namespaces, and which hosts the
// platform delegates to which namespaces.
type Config struct {
	Enabled bool `yaml:"enabled"`
	// Namespaces whose TokenPolicies and TokenIssuers are read: a list, or
	// "all" (the default).
	Namespaces Namespaces `yaml:"namespaces"`
	// HostDelegation lets namespaces (names or "team-*" patterns) claim
	// hosts (exact, or "*.suffix") beyond their own
	// *.<namespace>.svc.cluster.local and *.<namespace>.svc.
	HostDelegation []Delegation `yaml:"host_delegation"`
}

// Delegation delegates hosts to namespaces.
type Delegation struct {
	Namespaces []string `yaml:"namespaces"`
	Hosts      []string `yaml:"hosts"`
}

// Namespaces is "all" or a list of namespace names.
type Namespaces struct {
	All   bool
	Names []string
}

// UnmarshalYAML takes "all" or a list of names.
func (n *Namespaces) UnmarshalYAML(unmarshal func(any) error) error {
	var s string
	if unmarshal(&s) == nil {
		if s != "all" {
			return fmt.Errorf("namespaces: a list of names, or all")
		}
		*n = Namespaces{All: true}
		return nil
	}
	var list []string
	if err := unmarshal(&list); err != nil {
		return fmt.Errorf("namespaces: a list of names, or all")
	}
	*n = Namespaces{Names: list}
	return nil
}

// MarshalYAML writes "all" or the list.
func (n Namespaces) MarshalYAML() (any, error) {
	if n.All || len(n.Names) == 0 {
		return "all", nil
	}
	return n.Names, nil
}

// Watched reports whether the namespace's resources are read.
func (n Namespaces) Watched(ns string) bool {
	if n.All || len(n.Names) == 0 {
		return true
	}
	for _, name := range n.Names {
		if name == ns {
			return true
		}
	}
	return false
}

// Validate returns the section's problems, each naming its key.
func (c *Config) Validate() []string {
	var p []string
	for i, d := range c.HostDelegation {
		key := fmt.Sprintf("kubernetes.host_delegation[%d]", i)
		if len(d.Namespaces) == 0 || len(d.Hosts) == 0 {
			p = append(p, key+": names namespaces and hosts")
		}
		for j, ns := range d.Namespaces {
			if _, err := path.Match(ns, ""); err != nil || ns == "" {
				p = append(p, fmt.Sprintf("%s.namespaces[%d]: %q is not a name or pattern", key, j, ns))
			}
		}
		for j, h := range d.Hosts {
			if h == "" || strings.Contains(strings.TrimPrefix(h, "*."), "*") || h != strings.ToLower(h) {
				p = append(p, fmt.Sprintf("%s.hosts[%d]: %q is not a lower-case host or *.suffix", key, j, h))
			}
		}
	}
	return p
}

// delegated reports whether namespace ns may claim host (exact or "*.x").
func (c *Config) delegated(ns, host string) bool {
	for _, pat := range []string{"*." + ns + ".svc.cluster.local", "*." + ns + ".svc"} {
		if covers(pat, host) {
			return true
		}
	}
	for _, d := range c.HostDelegation {
		nsOK := false
		for _, p := range d.Namespaces {
			if ok, _ := path.Match(p, ns); ok {
				nsOK = true
				break
			}
		}
		if !nsOK {
			continue
		}
		for _, pat := range d.Hosts {
			if covers(pat, host) {
				return true
			}
		}
	}
	return false
}

// covers reports whether the delegated pattern pat includes host: an exact
// pattern only itself, "*.s" every name under s (and patterns under it).
func covers(pat, host string) bool {
	if pat == host {
		return true
	}
	suffix, wild := strings.CutPrefix(pat, "*")
	if !wild {
		return false
	}
	name := strings.TrimPrefix(host, "*")
	return strings.HasSuffix(name, suffix) && len(name) > len(suffix)
}
