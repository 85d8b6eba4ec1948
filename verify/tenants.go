package verify

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/maypok86/otter/v2"
	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"

	"github.com/tokenauthz/tokenauthz/cache"
)

// tenantPlaceholder is the one placeholder of an issuer template.
const tenantPlaceholder = "{tenant}"

const (
	defaultMaxTenantsCached        = 10000
	defaultMaxDiscoveriesPerSecond = 10
	// maxTenantLen bounds a tenant value (a DNS label is at most 63).
	maxTenantLen = 64
	// pendingTenants bounds the tenants held while their keys have never
	// loaded (in flight, or failing with back-off): a flood of made-up
	// tenants stays here and never pushes a working tenant out.
	pendingTenants = 4096
	// tenantsFilePoll is how often a tenants file is checked for change.
	// Polling the path (not an inotify watch) follows a Kubernetes
	// ConfigMap's symlink swap and costs one stat.
	tenantsFilePoll = 2 * time.Second
)

// template is an issuer template split at its placeholder. A token's iss
// fits when it is prefix + tenant + suffix with a tenant of the safe
// charset: no character of it can end the host or a path segment, so the
// placeholder never reaches another scheme, host, port, path, query or
// fragment, whatever the token says.
type template struct {
	prefix, suffix string
	hostLabel      bool // the placeholder is a label of the host
	pattern        *regexp.Regexp
}

func parseTemplate(tmpl, pattern string) (*template, error) {
	if n := strings.Count(tmpl, tenantPlaceholder); n != 1 {
		return nil, fmt.Errorf("needs exactly one %s placeholder, has %d", tenantPlaceholder, n)
	}
	if strings.ContainsAny(tmpl, "?#@") {
		return nil, errors.New("a query, fragment or user info has no place in an issuer")
	}
	prefix, suffix, _ := strings.Cut(tmpl, tenantPlaceholder)
	u, err := url.Parse(prefix + "tenant" + suffix)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("%q is not a URL with a host", tmpl)
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return nil, fmt.Errorf("%q: scheme must be https", tmpl)
	}
	t := &template{prefix: prefix, suffix: suffix}
	schemeEnd := len(u.Scheme) + len("://")
	hostEnd := schemeEnd + len(u.Host)
	switch at := len(prefix); {
	case at < schemeEnd:
		return nil, errors.New("the placeholder cannot be in the scheme")
	case at < hostEnd:
		// Only a whole label of the host name, followed by at least a
		// domain and its TLD, never the port: the value chooses a
		// subdomain of the template's domain, nothing more.
		host, _, _ := strings.Cut(tmpl[schemeEnd:], "/")
		name := host
		if i := strings.LastIndexByte(host, ':'); i >= 0 && !strings.Contains(host[i:], tenantPlaceholder) {
			name = host[:i]
		}
		labels := strings.Split(name, ".")
		i := slices.Index(labels, tenantPlaceholder)
		if i < 0 || len(labels)-i-1 < 2 {
			return nil, errors.New("in the host, the placeholder must be a whole label followed by a domain (https://{tenant}.example.com)")
		}
		t.hostLabel = true
	}
	if pattern != "" {
		if t.pattern, err = regexp.Compile(`^(?:` + pattern + `)$`); err != nil {
			return nil, fmt.Errorf("tenant_pattern: %v", err)
		}
	}
	return t, nil
}

// safeTenant is the charset every tenant value keeps to, whatever the
// pattern: characters that cannot end a path segment or a host label, and
// no dots (so never "." or "..").
func (t *template) safeTenant(s string) bool {
	if s == "" || len(s) > maxTenantLen || t.hostLabel && len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
		case (c >= 'A' && c <= 'Z' || c == '_') && !t.hostLabel:
		default:
			return false
		}
	}
	if t.hostLabel && (s[0] == '-' || s[len(s)-1] == '-') {
		return false
	}
	return t.pattern == nil || t.pattern.MatchString(s)
}

// match returns the tenant named by iss, if iss fits the template.
func (t *template) match(iss string) (string, bool) {
	if len(iss) > len(t.prefix)+len(t.suffix)+maxTenantLen || !strings.HasPrefix(iss, t.prefix) || !strings.HasSuffix(iss, t.suffix) {
		return "", false
	}
	if len(iss) <= len(t.prefix)+len(t.suffix) {
		return "", false
	}
	tenant := iss[len(t.prefix) : len(iss)-len(t.suffix)]
	return tenant, t.safeTenant(tenant)
}

func (t *template) fill(s, tenant string) string {
	return strings.ReplaceAll(s, tenantPlaceholder, tenant)
}

// validateTemplate checks the template settings of c.
func (c *IssuerConfig) validateTemplate() []string {
	var p []string
	bad := func(key, format string, args ...any) { p = append(p, key+": "+fmt.Sprintf(format, args...)) }
	t, err := parseTemplate(c.IssuerTemplate, c.TenantPattern)
	if err != nil {
		key := "issuer_template"
		if strings.HasPrefix(err.Error(), "tenant_pattern") {
			key = "tenant_pattern"
		}
		bad(key, "%v", err)
	} else if err := checkFetchURL(t.fill(c.IssuerTemplate, "tenant"), c.Keys.withDefaults().AllowHTTP); err != nil {
		bad("issuer_template", "%v", err)
	}
	if c.JWKSURI != "" && t != nil && strings.Contains(c.JWKSURI, tenantPlaceholder) {
		if err := sameOrigin(t.fill(c.IssuerTemplate, "tenant"), t.fill(c.JWKSURI, "tenant"), c.DiscoveryAllowedHosts); err != nil && t.hostLabel {
			bad("jwks_uri", "with the placeholder in the issuer's host, a jwks_uri must be on the issuer's origin: %v", err)
		}
	}
	if c.MaxTenantsCached < 0 {
		bad("max_tenants_cached", "must be positive")
	}
	if c.MaxDiscoveriesPerSecond < 0 {
		bad("max_discoveries_per_second", "must be positive")
	}
	ts := c.Tenants
	if ts == nil {
		bad("tenants", "required with issuer_template: allow (a list), file, or any: true")
		return p
	}
	n := 0
	for _, set := range []bool{len(ts.Allow) > 0, ts.File != "", ts.Any} {
		if set {
			n++
		}
	}
	if n != 1 {
		bad("tenants", "set exactly one of allow, file, any")
	}
	if t == nil {
		return p
	}
	for i, v := range ts.Allow {
		if !t.safeTenant(v) {
			bad(fmt.Sprintf("tenants.allow[%d]", i), "%q does not fit the tenant pattern (1-64 of [A-Za-z0-9_-], a host label: [a-z0-9-])", truncate(v, 80))
		}
	}
	if ts.File != "" {
		if _, skipped, err := readTenantsFile(ts.File, t); err != nil {
			bad("tenants.file", "%v", err)
		} else if len(skipped) > 0 {
			bad("tenants.file", "line %d: %q does not fit the tenant pattern (%d such lines)", skipped[0].line, truncate(skipped[0].value, 80), len(skipped))
		}
	}
	return p
}

type skippedLine struct {
	line  int
	value string
}

// readTenantsFile reads one tenant a line; lines that do not fit are
// skipped and reported.
func readTenantsFile(path string, t *template) (map[string]struct{}, []skippedLine, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	set := map[string]struct{}{}
	var skipped []skippedLine
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !t.safeTenant(line) {
			skipped = append(skipped, skippedLine{n, line})
			continue
		}
		set[line] = struct{}{}
	}
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return set, skipped, nil
}

// tenantFamily is an issuer template's state: which tenants it accepts and
// the issuer of each tenant seen. It belongs to the configured issuer (the
// family's root), so a reload that keeps the issuer keeps its tenants.
type tenantFamily struct {
	root *Issuer
	tmpl *template
	// allowed is nil for any: true.
	allowed atomic.Pointer[map[string]struct{}]
	file    string
	log     *slog.Logger

	// loaded holds tenants whose keys loaded at least once (bounded by
	// max_tenants_cached, W-TinyLFU); pending the others.
	loaded, pending *otter.Cache[string, *Issuer]
	mu              sync.Mutex // serialises creating a tenant's issuer

	// Discovery budget: fleet-wide through Redis when there is a tier,
	// else (and while Redis fails) this pod's limiter.
	perSecond int
	local     *rate.Limiter
	shared    *cache.Shared
	now       func() time.Time
	o         Options
	mem       *dpopMemory
	flights   singleflight.Group // the tenants' key fetches (remoteKeys.flights)
}

func newTenantFamily(root *Issuer, o Options, mem *dpopMemory) (*tenantFamily, error) {
	c := *root.cfg
	t, err := parseTemplate(c.IssuerTemplate, c.TenantPattern)
	if err != nil {
		return nil, err
	}
	maxCached := c.MaxTenantsCached
	if maxCached == 0 {
		maxCached = defaultMaxTenantsCached
	}
	perSecond := c.MaxDiscoveriesPerSecond
	if perSecond == 0 {
		perSecond = defaultMaxDiscoveriesPerSecond
	}
	f := &tenantFamily{root: root, tmpl: t, log: o.Logger.With("issuer_name", c.Name), perSecond: perSecond,
		local: rate.NewLimiter(rate.Limit(perSecond), perSecond), shared: o.Shared, now: o.Now, o: o, mem: mem}
	// A tenant dropped from loaded (for room) is no longer refreshed or
	// found: tokens verified under it are verified again, under the
	// tenant's issuer made anew. Nothing is verified under a pending
	// tenant that is not then promoted (loadedOnce), so dropping one needs
	// no mark.
	f.loaded = otter.Must(&otter.Options[string, *Issuer]{MaximumSize: maxCached,
		OnDeletion: func(e otter.DeletionEvent[string, *Issuer]) { e.Value.evicted.Store(true) }})
	f.pending = otter.Must(&otter.Options[string, *Issuer]{MaximumSize: pendingTenants})
	switch ts := c.Tenants; {
	case ts.Any:
	case ts.File != "":
		f.file = ts.File
		set, skipped, err := readTenantsFile(ts.File, t)
		if err != nil {
			return nil, fmt.Errorf("tenants.file: %w", err)
		}
		f.noteSkipped(skipped)
		f.allowed.Store(&set)
	default:
		f.allow(ts.Allow)
	}
	return f, nil
}

// allow makes list the accepted tenants (a reload may change it).
func (f *tenantFamily) allow(list []string) {
	set := make(map[string]struct{}, len(list))
	for _, v := range list {
		set[v] = struct{}{}
	}
	f.allowed.Store(&set)
}

func (f *tenantFamily) noteSkipped(skipped []skippedLine) {
	if len(skipped) > 0 {
		f.log.Warn("tenants file: lines that do not fit the tenant pattern are not accepted", "file", f.file,
			"skipped", len(skipped), "first_line", skipped[0].line)
	}
}

// admits says whether tenant is accepted now (the tenants file may have
// changed since a token of it was verified).
func (f *tenantFamily) admits(tenant string) bool {
	set := f.allowed.Load()
	if set == nil {
		return true
	}
	_, ok := (*set)[tenant]
	return ok
}

// issuer returns the issuer of tenant, creating it (without any fetch) on
// first sight. Its keys load on first use.
func (f *tenantFamily) issuer(tenant string) *Issuer {
	if is, ok := f.loaded.GetIfPresent(tenant); ok {
		return is
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if is, ok := f.loaded.GetIfPresent(tenant); ok {
		return is
	}
	if is, ok := f.pending.GetIfPresent(tenant); ok {
		if is.src.loaded() {
			f.promote(is)
		}
		return is
	}
	// tenant is a slice of the token's decoded payload (decodeString): a
	// copy, so that the tenant held does not keep its first token's bytes.
	tenant = strings.Clone(tenant)
	is := f.instantiate(tenant)
	f.pending.Set(tenant, is)
	return is
}

// promote moves a tenant whose keys loaded to the loaded tenants (f.mu
// held).
func (f *tenantFamily) promote(is *Issuer) {
	f.loaded.Set(is.tenant, is)
	if cur, ok := f.pending.GetIfPresent(is.tenant); ok && cur == is {
		f.pending.Invalidate(is.tenant)
	}
}

// loadedOnce is called after a tenant's token verified: its issuer, keys
// in hand, is promoted, also when the pending tenants had no room for it
// (a flood of made-up tenants fills them): a new tenant that works is
// kept however crowded the pending ones are.
func (f *tenantFamily) loadedOnce(is *Issuer) {
	if _, ok := f.loaded.GetIfPresent(is.tenant); ok {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.loaded.GetIfPresent(is.tenant); !ok && !is.evicted.Load() {
		f.promote(is)
	}
}

// instantiate builds a tenant's issuer from the template: the root's rules
// (algorithms, audiences, claims, DPoP settings) with the tenant's iss and
// endpoints, and keys fetched lazily, refreshed on use.
func (f *tenantFamily) instantiate(tenant string) *Issuer {
	root := f.root
	c := *root.cfg // the tenant's view, for building it; the issuer shares root.cfg
	c.Issuer = f.tmpl.fill(c.IssuerTemplate, tenant)
	c.JWKSURI = f.tmpl.fill(c.JWKSURI, tenant)
	is := &Issuer{cfg: root.cfg, iss: c.Issuer, name: root.name, leeway: root.leeway, algs: root.algs, auds: root.auds, tel: root.tel,
		id: root.id + "." + tenant, tenant: tenant, family: f}
	is.hmacKey = root.hmacKey
	if root.src != nil {
		// One inline or file key set for every tenant (a provider that
		// signs for all its tenants with one set, or a policy test).
		is.src = root.src
		return is
	}
	keys := c.Keys.withDefaults()
	is.src = &remoteKeys{
		issuer: c.Issuer, jwksURI: c.JWKSURI, discovery: c.Discovery, otherHosts: c.DiscoveryAllowedHosts, cfg: keys,
		client: root.tmplClient, log: f.log, tenant: tenant, flights: &f.flights, now: f.now,
		shared: f.shared, sharedName: sharedKeySetName(c), tel: root.tel, issuerName: root.name,
		lazy: true, gate: f.gate, published: &is.keyGen,
	}
	if root.cfg.DPoP != nil {
		is.dpop = newProofs(c.DPoP, is.leeway, f.now, f.shared, c.Issuer, f.mem)
	}
	if in := root.introspection; in != nil {
		cfg := *in.cfg
		cfg.Endpoint = f.tmpl.fill(cfg.Endpoint, tenant)
		is.introspection = &introspector{cfg: &cfg, secret: in.secret,
			endpoint: newEndpoint("introspection", is, cfg.Endpoint, func(d *discoveryDoc) string { return d.IntrospectionEndpoint },
				f.o.HTTPClient, cfg.Timeout, cfg.MaxResponseBytes, cfg.CacheTTL, cfg.NegativeCacheTTL)}
		is.introspection.budget = in.budget // the family's calls share one budget
	}
	if ui := root.userinfo; ui != nil {
		cfg := *ui.cfg
		cfg.Endpoint = f.tmpl.fill(cfg.Endpoint, tenant)
		is.userinfo = &userinfoClient{cfg: &cfg,
			endpoint: newEndpoint("userinfo", is, cfg.Endpoint, func(d *discoveryDoc) string { return d.UserinfoEndpoint },
				f.o.HTTPClient, cfg.Timeout, cfg.MaxResponseBytes, cfg.CacheTTL, cfg.NegativeCacheTTL)}
	}
	return is
}

// errDiscoveryBudget refuses a new tenant's first key load over the rate.
var errDiscoveryBudget = errors.New("too many new tenants are being discovered (max_discoveries_per_second); retry shortly")

// gate allows one first-time key load from the provider, within the
// family's rate: fleet-wide in Redis (a counter per second), or this pod's
// limiter when there is no Redis or it fails.
func (f *tenantFamily) gate(ctx context.Context) error {
	if f.shared != nil {
		n, err := f.shared.Tick(ctx, "tenants:"+f.root.id, f.now())
		if err == nil {
			if n > int64(f.perSecond) {
				return errDiscoveryBudget
			}
			return nil
		}
	}
	if !f.local.Allow() {
		return errDiscoveryBudget
	}
	return nil
}

// watch reloads the tenants file when it changes, until ctx ends. A file
// that cannot be read keeps the tenants last read (a missing file is a
// deployment fault, not a revocation) and is logged.
func (f *tenantFamily) watch(ctx context.Context) {
	if f.file == "" {
		return
	}
	stamp := func() string {
		st, err := os.Stat(f.file)
		if err != nil {
			return "error: " + err.Error()
		}
		return fmt.Sprint(st.ModTime().UnixNano(), st.Size(), st.Mode())
	}
	last := stamp()
	t := time.NewTicker(tenantsFilePoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := stamp()
		if now == last {
			continue
		}
		last = now
		f.reloadFile()
	}
}

func (f *tenantFamily) reloadFile() {
	set, skipped, err := readTenantsFile(f.file, f.tmpl)
	if err != nil {
		f.log.Error("tenants file not read; the tenants last read stay in force", "file", f.file, "error", err)
		return
	}
	f.noteSkipped(skipped)
	f.allowed.Store(&set)
	f.log.Info("tenants file read", "file", f.file, "tenants", len(set))
}

// matchTemplates finds the template issuers whose template iss fits. It
// makes no network call: a token names a tenant, never a URL.
func (v *Verifier) matchTemplates(iss string, allowed *Policy) (is *Issuer, refused error) {
	for _, f := range v.templates {
		tenant, ok := f.tmpl.match(iss)
		if !ok {
			continue
		}
		if !allowed.accepts(f.root.name) {
			refused = tagIssuer(invalid("issuer_not_allowed", "token issuer is not accepted for this route"), f.root.name)
			continue
		}
		if !f.admits(tenant) {
			return nil, tagIssuer(invalid("unknown_tenant", "token issuer's tenant is not accepted"), f.root.name)
		}
		return f.issuer(tenant), nil
	}
	if refused == nil {
		refused = invalid("unknown_issuer", "token issuer is not trusted")
	}
	return nil, refused
}
