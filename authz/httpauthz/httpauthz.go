// Package httpauthz is the HTTP transport of the decision core: an
// authorization endpoint for proxies that ask over HTTP (Envoy's and
// Istio's http_service, Envoy Gateway extAuth.http, nginx auth_request,
// Traefik forwardAuth). It turns each proxy's request shape into the same
// CheckRequest that Envoy's gRPC Check sends, so every rule of the core
// (the canonical request and its 400s, routes, CEL, DPoP, certificates,
// claim headers) holds unchanged, and turns the CheckResponse into the
// HTTP answer that proxy expects. It decides nothing itself.
//
// The shape is told by the request's path, one per proxy, never by headers
// a client could send: /nginx, /traefik, and the Envoy prefix (/envoy by
// default) followed by the original path. Only trusted_proxies may call it.
package httpauthz

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.opentelemetry.io/otel/propagation"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
)

// Config is the file config's http_authz section.
type Config struct {
	// Proxies are the request shapes the listener accepts: nginx, traefik,
	// envoy. Default all three.
	Proxies []string `yaml:"proxies"`
	// TrustedProxies (addresses or CIDRs) may call the listener; others
	// get 403. Default loopback only.
	TrustedProxies []string `yaml:"trusted_proxies"`
	// EnvoyPathPrefix is Envoy's http_service path_prefix: requests under it
	// are Envoy's, the rest of the path the original one. Default /envoy.
	EnvoyPathPrefix string `yaml:"envoy_path_prefix"`
}

// Proxy shapes.
const (
	Nginx   = "nginx"
	Traefik = "traefik"
	Envoy   = "envoy"
)

const defaultEnvoyPrefix = "/envoy"

// Validate returns the section's problems, each naming its key.
func (c *Config) Validate() []string {
	var p []string
	for i, s := range c.Proxies {
		if s != Nginx && s != Traefik && s != Envoy {
			p = append(p, fmt.Sprintf("http_authz.proxies[%d]: %q is not nginx, traefik or envoy", i, s))
		}
	}
	for i, s := range c.TrustedProxies {
		if _, err := parsePrefix(s); err != nil {
			p = append(p, fmt.Sprintf("http_authz.trusted_proxies[%d]: %q is not an address or CIDR", i, s))
		}
	}
	if pre := c.EnvoyPathPrefix; pre != "" && (!strings.HasPrefix(pre, "/") || strings.HasSuffix(pre, "/") || pre == "/nginx" || pre == "/traefik") {
		p = append(p, "http_authz.envoy_path_prefix: a path like /envoy, without a trailing /, other than /nginx and /traefik")
	}
	return p
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		return p.Masked(), err
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()), nil
}

// Checker is the decision core's Check (authz.Server).
type Checker interface {
	Check(context.Context, *authv3.CheckRequest) (*authv3.CheckResponse, error)
}

// Handler serves the HTTP authorization endpoint.
type Handler struct {
	check       Checker
	shapes      map[string]bool
	trusted     []netip.Prefix
	envoyPrefix string
	prop        propagation.TextMapPropagator
	log         *slog.Logger
}

// New builds the handler; the config must be valid. prop extracts the
// subrequest's trace context (W3C traceparent), nil for none.
func New(c Config, check Checker, prop propagation.TextMapPropagator, log *slog.Logger) (*Handler, error) {
	if p := c.Validate(); len(p) > 0 {
		return nil, fmt.Errorf("%s", strings.Join(p, "; "))
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if prop == nil {
		prop = propagation.TraceContext{}
	}
	h := &Handler{check: check, shapes: map[string]bool{}, envoyPrefix: c.EnvoyPathPrefix, prop: prop, log: log}
	if h.envoyPrefix == "" {
		h.envoyPrefix = defaultEnvoyPrefix
	}
	proxies := c.Proxies
	if len(proxies) == 0 {
		proxies = []string{Nginx, Traefik, Envoy}
	}
	for _, s := range proxies {
		h.shapes[s] = true
	}
	trusted := c.TrustedProxies
	if len(trusted) == 0 {
		trusted = []string{"127.0.0.0/8", "::1/128"}
	}
	for _, s := range trusted {
		p, _ := parsePrefix(s)
		h.trusted = append(h.trusted, p)
	}
	return h, nil
}

// Server is the listener's HTTP server: HTTP/1.1 with keep-alive and h2c
// (HTTP/2 with prior knowledge, as Envoy's http_service can use), bounded
// header sizes and timeouts.
func (h *Handler) Server() *http.Server {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 64 << 10,
		ErrorLog: slog.NewLogLogger(h.log.Handler(), slog.LevelDebug)}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	return srv
}

// refuse answers a request this listener does not take: 403 with a body
// that says why (the proxy's operator reads it, not the end user).
func refuse(w http.ResponseWriter, why string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusForbidden)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": "not_authorized_caller", "error_description": why})
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	peer, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil || !h.isTrusted(peer.Addr()) {
		refuse(w, "this endpoint answers only the proxies listed in http_authz.trusted_proxies")
		return
	}
	shape, orig, why := h.shapeOf(r)
	if why != "" {
		refuse(w, why)
		return
	}
	req, why := checkRequest(r, shape, orig, peer.Addr())
	if why != "" {
		writeDecision(w, shape, &authv3.CheckResponse{}, http.StatusBadRequest, why)
		return
	}
	ctx := h.prop.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
	resp, err := h.check.Check(authz.WithTransport(ctx, "http"), req)
	if err != nil {
		// undecidable_response: grpc_unavailable: no decision, a 503.
		writeDecision(w, shape, &authv3.CheckResponse{}, http.StatusServiceUnavailable, "authorization is temporarily unavailable")
		return
	}
	writeDecision(w, shape, resp, 0, "")
}

func (h *Handler) isTrusted(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range h.trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// original is the request the proxy asks about.
type original struct {
	method, uri, host, scheme string
}

// shapeOf tells the proxy by the path it called and reads the original
// request from that proxy's headers.
func (h *Handler) shapeOf(r *http.Request) (shape string, o original, why string) {
	one := func(name string) (string, string) {
		vs := r.Header.Values(name)
		switch {
		case len(vs) == 0 || vs[0] == "":
			return "", name + " is missing"
		case len(vs) > 1:
			return "", name + " is sent more than once"
		}
		return vs[0], ""
	}
	opt := func(name, def string) (string, string) {
		if len(r.Header.Values(name)) == 0 {
			return def, ""
		}
		return one(name)
	}
	var w [4]string
	switch path := r.URL.EscapedPath(); {
	case path == "/nginx" && h.shapes[Nginx] && len(r.Header.Values("X-Original-URI")) == 0 && len(r.Header.Values("X-Original-URL")) > 0:
		// ingress-nginx's auth-url: X-Original-URL is $scheme://$http_host$request_uri.
		shape = Nginx
		var u string
		u, w[0] = one("X-Original-URL")
		o.method, w[1] = one("X-Original-Method")
		if w[0] == "" {
			scheme, rest, ok := strings.Cut(u, "://")
			slash := strings.IndexByte(rest, '/')
			if !ok || slash <= 0 {
				w[0] = "X-Original-URL is not scheme://host/path"
			} else {
				o.scheme, o.host, o.uri = scheme, rest[:slash], rest[slash:]
			}
		}
	case path == "/nginx" && h.shapes[Nginx]:
		shape = Nginx
		o.uri, w[0] = one("X-Original-URI")
		o.method, w[1] = one("X-Original-Method")
		o.host, w[2] = one("X-Forwarded-Host")
		o.scheme, w[3] = opt("X-Forwarded-Proto", "http")
	case path == "/traefik" && h.shapes[Traefik]:
		shape = Traefik
		o.uri, w[0] = one("X-Forwarded-Uri")
		o.method, w[1] = one("X-Forwarded-Method")
		o.host, w[2] = one("X-Forwarded-Host")
		o.scheme, w[3] = one("X-Forwarded-Proto")
	case (path == h.envoyPrefix || strings.HasPrefix(path, h.envoyPrefix+"/")) && h.shapes[Envoy]:
		// Envoy sends the original method and path (after path_prefix)
		// and the original :authority as Host.
		shape = Envoy
		o.method, o.host = r.Method, r.Host
		o.uri = strings.TrimPrefix(r.RequestURI, h.envoyPrefix)
		if o.uri == "" || o.uri[0] == '?' {
			o.uri = "/" + o.uri
		}
		o.scheme, w[3] = opt("X-Forwarded-Proto", "http")
	default:
		var on []string
		for _, s := range []string{Envoy, Nginx, Traefik} {
			if h.shapes[s] {
				on = append(on, map[string]string{Nginx: "/nginx", Traefik: "/traefik", Envoy: h.envoyPrefix + "/…"}[s])
			}
		}
		return "", o, "not a request shape this listener takes: call " + strings.Join(on, ", ") + " (see the README's HTTP endpoint section)"
	}
	for _, s := range w {
		if s != "" {
			return "", o, "a " + shape + " request: " + s
		}
	}
	// The proxy's scheme header may be a list (X-Forwarded-Proto through
	// several proxies): the nearest proxy's entry counts.
	if i := strings.LastIndexByte(o.scheme, ','); i >= 0 {
		o.scheme = o.scheme[i+1:]
	}
	o.scheme = strings.ToLower(strings.TrimSpace(o.scheme))
	return shape, o, ""
}

// forwarding are the headers that describe the original request to us:
// they are the proxy's, not the client's, and are not passed on as request
// headers (hop-by-hop ones neither).
var forwarding = map[string]bool{
	"X-Original-Uri": true, "X-Original-Url": true, "X-Original-Method": true, "X-Forwarded-Host": true, "X-Forwarded-Proto": true,
	"X-Forwarded-Uri": true, "X-Forwarded-Method": true, "X-Ssl-Client-Cert": true, "X-Forwarded-Tls-Client-Cert": true,
	"Connection": true, "Keep-Alive": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
	"Proxy-Connection": true, "Content-Length": true,
}

// checkRequest builds the CheckRequest Envoy would send for the original
// request, with the client's headers as raw header_map entries (so the
// core reads them as it reads Envoy's encode_raw_headers).
func checkRequest(r *http.Request, shape string, o original, peer netip.Addr) (*authv3.CheckRequest, string) {
	hs := make([]*corev3.HeaderValue, 0, len(r.Header)+4)
	raw := func(k, v string) { hs = append(hs, &corev3.HeaderValue{Key: k, RawValue: []byte(v)}) }
	raw(":method", o.method)
	raw(":authority", o.host)
	raw(":path", o.uri)
	raw(":scheme", o.scheme)
	names := make([]string, 0, len(r.Header))
	for k := range r.Header {
		names = append(names, k)
	}
	slices.Sort(names) // a stable order; the core reads repeats in the order received
	for _, k := range names {
		if forwarding[k] || strings.HasPrefix(k, ":") {
			continue
		}
		lk := strings.ToLower(k)
		for _, v := range r.Header[k] {
			raw(lk, v)
		}
	}
	if r.Host != "" && shape != Envoy {
		// The subrequest's own Host names us, not the original host: the
		// core must not read it as the original's.
		hs = slices.DeleteFunc(hs, func(h *corev3.HeaderValue) bool { return h.GetKey() == "host" })
	}
	cert, why := clientCert(r, shape)
	if why != "" {
		return nil, why
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: o.method, Host: o.host, Path: o.uri, Scheme: o.scheme, Protocol: r.Proto,
			HeaderMap: &corev3.HeaderMap{Headers: hs},
		}},
		Source: &authv3.AttributeContext_Peer{
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
				Address: clientAddr(r, peer)}}},
			Certificate: cert,
		},
	}}, ""
}

// clientAddr is the client's address: the last X-Forwarded-For entry (the
// one the proxy that called us appended) when it is an address, else the
// proxy's own.
func clientAddr(r *http.Request, peer netip.Addr) string {
	if v := strings.Join(r.Header.Values("X-Forwarded-For"), ","); v != "" {
		if i := strings.LastIndexByte(v, ','); i >= 0 {
			v = v[i+1:]
		}
		if a, err := netip.ParseAddr(strings.TrimSpace(v)); err == nil {
			return a.Unmap().WithZone("").String()
		}
	}
	return peer.Unmap().String()
}

// clientCert is the client certificate as Envoy sends it (URL-encoded PEM):
// nginx's $ssl_client_escaped_cert in X-SSL-Client-Cert, or Traefik's
// passTLSClientCert (pem: true) in X-Forwarded-Tls-Client-Cert (base64 DER
// without PEM lines; the first of a comma list is the client's).
func clientCert(r *http.Request, shape string) (string, string) {
	switch shape {
	case Nginx:
		vs := r.Header.Values("X-Ssl-Client-Cert")
		if len(vs) > 1 {
			return "", "X-SSL-Client-Cert is sent more than once"
		}
		if len(vs) == 1 {
			return vs[0], ""
		}
	case Traefik:
		vs := r.Header.Values("X-Forwarded-Tls-Client-Cert")
		if len(vs) > 1 {
			return "", "X-Forwarded-Tls-Client-Cert is sent more than once"
		}
		if len(vs) == 1 && vs[0] != "" {
			first, _, _ := strings.Cut(vs[0], ",")
			if u, err := url.QueryUnescape(first); err == nil {
				first = u
			}
			der, err := base64.StdEncoding.DecodeString(strings.TrimSpace(first))
			if err != nil {
				return "", "X-Forwarded-Tls-Client-Cert is not base64"
			}
			return url.QueryEscape(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))), ""
		}
	}
	return "", ""
}

// writeDecision answers as the proxy expects: 200 with the claim headers to
// allow (Envoy also gets x-envoy-auth-headers-to-remove); the denial's
// status, headers and body otherwise. status overrides for a request that
// never reached the core (400) or a gRPC error (503).
func writeDecision(w http.ResponseWriter, shape string, resp *authv3.CheckResponse, status int, desc string) {
	hdr := w.Header()
	if status != 0 {
		hdr.Set("Content-Type", "application/json")
		w.WriteHeader(status)
		code := map[int]string{http.StatusBadRequest: "invalid_request", http.StatusServiceUnavailable: "unavailable"}[status]
		_ = json.NewEncoder(w).Encode(map[string]string{"error": code, "error_description": desc})
		return
	}
	if codes.Code(resp.GetStatus().GetCode()) == codes.OK {
		ok := resp.GetOkResponse()
		for _, h := range ok.GetHeaders() {
			hdr.Set(h.GetHeader().GetKey(), h.GetHeader().GetValue())
		}
		if shape == Envoy && len(ok.GetHeadersToRemove()) > 0 {
			hdr.Set("X-Envoy-Auth-Headers-To-Remove", strings.Join(ok.GetHeadersToRemove(), ","))
		}
		w.WriteHeader(http.StatusOK)
		return
	}
	d := resp.GetDeniedResponse()
	if d == nil {
		d = resp.GetErrorResponse()
	}
	for _, h := range d.GetHeaders() {
		hdr.Set(h.GetHeader().GetKey(), h.GetHeader().GetValue())
	}
	code := int(d.GetStatus().GetCode())
	if code == 0 {
		code = http.StatusForbidden
	}
	w.WriteHeader(code)
	_, _ = w.Write([]byte(d.GetBody()))
}
