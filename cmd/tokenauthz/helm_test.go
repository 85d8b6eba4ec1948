package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"sigs.k8s.io/yaml"

	yamlv3 "go.yaml.in/yaml/v3"
)

const chartDir = "../../deploy/helm/tokenauthz"

// renderChart renders the chart with Helm's own engine for vals and decodes
// every object strictly into its Go type.
func renderChart(t *testing.T, vals map[string]any) map[string]any {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{Name: "tokenauthz", Namespace: "tokenauthz", IsInstall: true},
		chartutil.DefaultCapabilities)
	if err != nil {
		t.Fatal(err)
	}
	files, err := engine.Render(ch, rv)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]any{}
	// The chart's crds/ are installed by helm install before the templates.
	for _, crd := range ch.CRDObjects() {
		var obj apiextensionsv1.CustomResourceDefinition
		if err := yaml.UnmarshalStrict(crd.File.Data, &obj); err != nil {
			t.Fatalf("%s: %v", crd.Filename, err)
		}
		out["CustomResourceDefinition/"+obj.Name] = &obj
	}
	for name, body := range files {
		if strings.HasSuffix(name, "NOTES.txt") || strings.HasSuffix(name, ".tpl") {
			continue
		}
		for _, doc := range strings.Split(body, "\n---\n") {
			if strings.TrimSpace(strings.Trim(doc, "-\n")) == "" {
				continue
			}
			var meta struct {
				Kind     string `json:"kind"`
				Metadata struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
				t.Fatalf("%s: %v\n%s", name, err, doc)
			}
			obj := newObject(t, meta.Kind)
			if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
				t.Fatalf("%s %s: %v\n%s", name, meta.Kind, err, doc)
			}
			out[meta.Kind+"/"+meta.Metadata.Name] = obj
		}
	}
	return out
}

// TestHelmChart renders the chart for the default values and for a full
// set (Redis, ServiceMonitor, PrometheusRule, a pinned digest), decodes
// every object strictly, checks what the objects promise, and runs Helm's
// linter.
func TestHelmChart(t *testing.T) {
	full := map[string]any{
		"image":     map[string]any{"tag": "v0.2.0", "digest": "sha256:" + strings.Repeat("ab", 32)},
		"redis":     map[string]any{"enabled": true},
		"metrics":   map[string]any{"serviceMonitor": map[string]any{"enabled": true}, "prometheusRule": map[string]any{"enabled": true}},
		"resources": map[string]any{"limits": map[string]any{"memory": "1Gi"}},
	}
	for name, vals := range map[string]map[string]any{"defaults": nil, "full": full} {
		t.Run(name, func(t *testing.T) {
			objs := renderChart(t, vals)
			d, _ := objs["Deployment/tokenauthz"].(*appsv1.Deployment)
			if d == nil {
				t.Fatalf("no Deployment/tokenauthz: %v", keys(objs))
			}
			c := d.Spec.Template.Spec.Containers[0]
			if strings.HasSuffix(c.Image, ":latest") || !strings.Contains(c.Image, ":v0.") {
				t.Errorf("image %q", c.Image)
			}
			for _, e := range c.Env {
				if e.Name == "GOMEMLIMIT" && e.Value != map[string]string{"defaults": "230MiB", "full": "921MiB"}[name] {
					t.Errorf("GOMEMLIMIT %q, want 90%% of the limit", e.Value)
				}
			}
			cm := objs["ConfigMap/tokenauthz"].(*corev1.ConfigMap)
			// A valid config, but for the secret files that live in the
			// cluster, not here.
			if _, err := parseConfig([]byte(cm.Data["config.yaml"]), "chart config"); err != nil {
				for _, p := range err.(*configError).problems {
					if !strings.Contains(p, "no such file") {
						t.Errorf("the chart's config: %s", p)
					}
				}
			}
			var cfg fileConfig
			if err := yamlv3.Unmarshal([]byte(cm.Data["config.yaml"]), &cfg); err != nil {
				t.Fatal(err)
			}
			checkPolicyResources(t, objs, "tokenauthz", d.Spec.Template.Spec.ServiceAccountName)
			if !cfg.Kubernetes.Enabled {
				t.Error("the chart's config does not read the policy resources")
			}
			for _, kind := range []string{"Service", "ServiceAccount", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} {
				if objs[kind+"/tokenauthz"] == nil {
					t.Errorf("no %s", kind)
				}
			}
			if name == "defaults" {
				if cfg.Cache.Redis != nil || objs["StatefulSet/tokenauthz-redis"] != nil || objs["ServiceMonitor/tokenauthz"] != nil {
					t.Error("optional parts are on by default")
				}
				return
			}
			// The rendered pod's config validates with the files the chart
			// mounts (the chart's own Secrets and ConfigMaps, laid out at
			// their mount paths): nothing it names is missing.
			root := t.TempDir()
			pod := d.Spec.Template.Spec
			for _, m := range c.VolumeMounts {
				for _, v := range pod.Volumes {
					if v.Name != m.Name {
						continue
					}
					files := map[string]string{}
					switch {
					case v.Secret != nil:
						if sec, _ := objs["Secret/"+v.Secret.SecretName].(*corev1.Secret); sec != nil {
							for k, b := range sec.Data {
								files[k] = string(b)
							}
						} else if v.Secret.Optional == nil || !*v.Secret.Optional {
							t.Errorf("the pod requires Secret %s, which the chart does not make", v.Secret.SecretName)
						}
					case v.ConfigMap != nil:
						for k, d := range objs["ConfigMap/"+v.ConfigMap.Name].(*corev1.ConfigMap).Data {
							files[k] = d
						}
					}
					for k, body := range files {
						dir := filepath.Join(root, m.MountPath)
						if err := os.MkdirAll(dir, 0o700); err != nil {
							t.Fatal(err)
						}
						_ = os.WriteFile(filepath.Join(dir, k), []byte(body), 0o600)
					}
				}
			}
			rooted := strings.ReplaceAll(cm.Data["config.yaml"], "/etc/tokenauthz/", root+"/etc/tokenauthz/")
			if _, err := parseConfig([]byte(rooted), "the rendered pod's config"); err != nil {
				t.Errorf("with the files the chart mounts: %v", err)
			}
			if !strings.Contains(c.Image, "@sha256:") {
				t.Errorf("digest not pinned: %q", c.Image)
			}
			if cfg.Cache.Redis == nil || cfg.Cache.Redis.Addrs[0] != "tokenauthz-redis:6379" || objs["StatefulSet/tokenauthz-redis"] == nil {
				t.Error("redis.enabled does not deploy Redis and point the config at it")
			}
			rule := objs["PrometheusRule/tokenauthz"].(*monitoringv1.PrometheusRule)
			var alerts []string
			for _, g := range rule.Spec.Groups {
				for _, r := range g.Rules {
					alerts = append(alerts, r.Alert)
				}
			}
			for _, want := range []string{"TokenauthzDecisionErrors", "TokenauthzUndecidableChecks", "TokenauthzKeySetStale", "TokenauthzRedisBreakerOpen"} {
				if !strings.Contains(strings.Join(alerts, " "), want) {
					t.Errorf("no alert %s", want)
				}
			}
			if sm := objs["ServiceMonitor/tokenauthz"].(*monitoringv1.ServiceMonitor); sm.Spec.Endpoints[0].Port != "http" {
				t.Errorf("ServiceMonitor endpoints %+v", sm.Spec.Endpoints)
			}
		})
	}
	// Helm's linter, strict: nothing above INFO.
	for _, vals := range []map[string]any{nil, full} {
		l := lint.All(chartDir, vals, "tokenauthz", true)
		for _, m := range l.Messages {
			if m.Severity > support.InfoSev {
				t.Errorf("helm lint: %s", m)
			}
		}
	}
}
