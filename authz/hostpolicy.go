package authz

import (
	"fmt"
	"strings"

	"github.com/tokenauthz/tokenauthz/verify"
)

// HostPolicy is a policy source's routes for some hosts (a Kubernetes
// TokenPolicy): the file config's route schema, selected by the request's
// canonical host when no file route matched.
type HostPolicy struct {
	// Name identifies the policy in route names, logs and metrics
	// ("namespace/name"); its routes are named Name + "/" + route.
	Name string
	// Hosts are exact names or "*.suffix", lower case, without port.
	Hosts []string
	// Issuers are the names (in the assembled Config's issuers) that the
	// routes accept unless a route names its own.
	Issuers []string
	Routes  []RouteConfig
}

// CompiledHostPolicy is a HostPolicy compiled for the hot path. It is
// immutable, so a source compiles each policy once and hands the same
// value to every Config it assembles.
type CompiledHostPolicy struct {
	name   string
	hosts  []string
	routes []*route
}

// Name is the policy's name.
func (h *CompiledHostPolicy) Name() string { return h.name }

// CompileHostPolicy checks hp against the config it will be assembled into
// (its issuers and top-level headers) and compiles it. The problems name
// their keys as in the resource (hosts[1], routes[0].when[2]) with CEL's
// line and column; any problem means no policy.
func CompileHostPolicy(top *Config, hp HostPolicy) (*CompiledHostPolicy, []string) {
	var p []string
	names := map[string]bool{}
	byName := map[string]*verify.IssuerConfig{}
	all := top.AllIssuers()
	for i := range all {
		names[all[i].Name] = true
		byName[all[i].Name] = &all[i]
	}
	if len(hp.Hosts) == 0 {
		p = append(p, "hosts: at least one host is required")
	}
	for i, h := range hp.Hosts {
		if why := hostPatternProblem(h); why != "" {
			p = append(p, fmt.Sprintf("hosts[%d]: %s", i, why))
		} else if h != strings.ToLower(h) {
			p = append(p, fmt.Sprintf("hosts[%d]: lower case only", i))
		}
	}
	for i, n := range hp.Issuers {
		if !names[n] {
			p = append(p, fmt.Sprintf("issuers[%d]: no issuer named %q", i, n))
		}
	}
	if len(hp.Routes) == 0 {
		p = append(p, "routes: at least one route is required")
	}
	// A route without issuers accepts the policy's, never every issuer.
	routes := make([]RouteConfig, len(hp.Routes))
	for i, rc := range hp.Routes {
		if len(rc.Issuers) == 0 {
			rc.Issuers = hp.Issuers
		}
		routes[i] = rc
	}
	p = append(p, validateRoutes("routes", routes, names, byName, top.Headers, false)...)
	if len(p) > 0 {
		return nil, p
	}
	c := &CompiledHostPolicy{name: hp.Name, hosts: hp.Hosts}
	for _, rc := range routes {
		r, err := compileRoute(rc, hp.Name+"/"+rc.Name, hp.Issuers, top.Headers)
		if err != nil {
			return nil, []string{err.Error()}
		}
		c.routes = append(c.routes, r)
	}
	return c, nil
}

// hostRoutes are the routes of the policy for host ("" for none): its
// exact name, else the longest "*." suffix it has. O(labels).
func (p *policy) hostRoutes(host string) []*route {
	if len(p.hosts) == 0 && len(p.wildHosts) == 0 {
		return nil
	}
	if hp, ok := p.hosts[host]; ok {
		return hp.routes
	}
	for i := 0; i < len(host); i++ {
		if host[i] == '.' {
			if hp, ok := p.wildHosts[host[i:]]; ok {
				return hp.routes
			}
		}
	}
	return nil
}

// allRoutes are the file's routes and every host policy's.
func (p *policy) allRoutes() []*route {
	out := append([]*route(nil), p.routes...)
	seen := map[*CompiledHostPolicy]bool{}
	for _, m := range []map[string]*CompiledHostPolicy{p.hosts, p.wildHosts} {
		for _, hp := range m {
			if !seen[hp] {
				seen[hp] = true
				out = append(out, hp.routes...)
			}
		}
	}
	return out
}
