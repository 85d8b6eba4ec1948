package deploy_test

import (
	"os"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"
)

// TestEnvoyYAML decodes the repository's envoy.yaml strictly into Envoy's
// bootstrap type and runs its validation rules, so a misspelled field or a
// missing required one fails CI. Envoy's runtime checks are not covered.
func TestEnvoyYAML(t *testing.T) {
	raw, err := os.ReadFile("../envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var b bootstrapv3.Bootstrap
	decodeStrict(t, raw, &b)
	if err := b.ValidateAll(); err != nil {
		t.Fatal(err)
	}
	// Check the parts tokenauthz depends on.
	l := b.GetStaticResources().GetListeners()[0]
	var hcm hcmv3.HttpConnectionManager
	if err := l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(&hcm); err != nil {
		t.Fatal(err)
	}
	if err := hcm.ValidateAll(); err != nil {
		t.Fatal(err)
	}
	var ea extauthzv3.ExtAuthz
	if err := hcm.GetHttpFilters()[0].GetTypedConfig().UnmarshalTo(&ea); err != nil {
		t.Fatal(err)
	}
	if err := ea.ValidateAll(); err != nil {
		t.Fatal(err)
	}
	if ea.GetFailureModeAllow() || ea.GetGrpcService().GetTimeout() == nil ||
		ea.GetGrpcService().GetEnvoyGrpc().GetClusterName() != "tokenauthz" || ea.GetTransportApiVersion().String() != "V3" {
		t.Errorf("ext_authz filter must be V3, fail closed, with a timeout, calling cluster tokenauthz: %v", &ea)
	}
	var disabled, named bool
	for _, r := range hcm.GetRouteConfig().GetVirtualHosts()[0].GetRoutes() {
		pf, ok := r.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]
		if !ok {
			continue
		}
		var per extauthzv3.ExtAuthzPerRoute
		if err := pf.UnmarshalTo(&per); err != nil {
			t.Fatal(err)
		}
		if err := per.ValidateAll(); err != nil {
			t.Fatal(err)
		}
		disabled = disabled || per.GetDisabled()
		named = named || per.GetCheckSettings().GetContextExtensions()["route"] != ""
	}
	if !ea.GetIncludePeerCertificate() || len(b.GetStaticResources().GetListeners()) < 2 ||
		b.GetStaticResources().GetListeners()[1].GetFilterChains()[0].GetTransportSocket() == nil {
		t.Error("certificate-bound tokens need include_peer_certificate and a TLS listener that asks for client certificates")
	}
	if !ea.GetEncodeRawHeaders() {
		t.Error("encode_raw_headers must be true: the request's own bytes, not a sanitized copy")
	}
	if !hcm.GetNormalizePath().GetValue() || !hcm.GetMergeSlashes() ||
		hcm.GetPathWithEscapedSlashesAction() != hcmv3.HttpConnectionManager_REJECT_REQUEST {
		t.Error("normalize_path, merge_slashes and path_with_escaped_slashes_action: REJECT_REQUEST add defence in depth")
	}
	if !disabled || !named {
		t.Errorf("want a route with ext_authz disabled (%v) and one naming a route in context_extensions (%v)", disabled, named)
	}
}

// TestEnvoyYAMLBypassesMatchExactly: a route (or virtual host) that skips
// ext_authz must match one exact path. A prefix "/healthz" also skips
// /healthzX and /healthz/..;/admin, which an upstream may serve as /admin.
func TestEnvoyYAMLBypassesMatchExactly(t *testing.T) {
	raw, err := os.ReadFile("../envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var b bootstrapv3.Bootstrap
	decodeStrict(t, raw, &b)
	if problems := bypassProblems(t, &b); len(problems) > 0 {
		t.Fatal(strings.Join(problems, "\n"))
	}
	// The check itself catches a prefix bypass.
	bad := strings.Replace(string(raw), `match: { path: "/healthz" }`, `match: { prefix: "/healthz" }`, 1)
	var bb bootstrapv3.Bootstrap
	decodeStrict(t, []byte(bad), &bb)
	if len(bypassProblems(t, &bb)) == 0 {
		t.Fatal("a prefix bypass was not reported")
	}
}

func bypassProblems(t *testing.T, b *bootstrapv3.Bootstrap) []string {
	t.Helper()
	disables := func(cfg map[string]*anypb.Any) bool {
		pf, ok := cfg["envoy.filters.http.ext_authz"]
		if !ok {
			return false
		}
		var per extauthzv3.ExtAuthzPerRoute
		if err := pf.UnmarshalTo(&per); err != nil {
			t.Fatal(err)
		}
		return per.GetDisabled()
	}
	var problems []string
	for _, l := range b.GetStaticResources().GetListeners() {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				var hcm hcmv3.HttpConnectionManager
				if f.GetTypedConfig().UnmarshalTo(&hcm) != nil {
					continue
				}
				for _, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
					if disables(vh.GetTypedPerFilterConfig()) {
						problems = append(problems, "virtual host "+vh.GetName()+" disables ext_authz for every path")
					}
					for _, r := range vh.GetRoutes() {
						if disables(r.GetTypedPerFilterConfig()) && r.GetMatch().GetPath() == "" {
							problems = append(problems, "route "+r.GetName()+" "+r.GetMatch().String()+" disables ext_authz without an exact path match")
						}
					}
				}
			}
		}
	}
	return problems
}

func TestEnvoyYAMLTypoFails(t *testing.T) {
	raw, err := os.ReadFile("../envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(string(raw), "failure_mode_allow:", "failure_mode_alow:", 1)
	js, err := yaml.YAMLToJSON([]byte(bad))
	if err != nil {
		t.Fatal(err)
	}
	var b bootstrapv3.Bootstrap
	if err := protojson.Unmarshal(js, &b); err == nil {
		t.Fatal("a misspelled field was accepted")
	}
}

func decodeStrict(t *testing.T, raw []byte, m proto.Message) {
	t.Helper()
	js, err := yaml.YAMLToJSON(raw)
	if err != nil {
		t.Fatal(err)
	}
	if err := protojson.Unmarshal(js, m); err != nil {
		t.Fatal(err)
	}
}
