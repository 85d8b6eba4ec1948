{{- define "tokenauthz.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "tokenauthz.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ext-authz
{{- end -}}

{{- define "tokenauthz.labels" -}}
{{ include "tokenauthz.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tokenauthz.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if eq $tag "latest" }}{{ fail "image.tag: pin a version, not latest" }}{{ end -}}
{{- if .Values.image.digest -}}{{ printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}{{- else -}}{{ printf "%s:%s" .Values.image.repository $tag }}{{- end -}}
{{- end -}}

{{/* The config, with cache.redis pointing at the chart's Redis when on. */}}
{{- define "tokenauthz.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- if .Values.redis.enabled -}}
{{- $redis := dict "addrs" (list (printf "%s-redis:6379" (include "tokenauthz.fullname" .))) -}}
{{- if .Values.redis.hmac }}{{ $_ := set $redis "hmac_key_file" "/etc/tokenauthz/redis-hmac/cache-hmac" }}{{ end -}}
{{- $cache := get $cfg "cache" | default dict -}}
{{- $_ := set $cache "redis" $redis -}}
{{- $_ := set $cfg "cache" $cache -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{- define "tokenauthz.goMemLimit" -}}
{{- if .Values.goMemLimitMiB -}}{{ .Values.goMemLimitMiB }}MiB
{{- else -}}
{{- $l := .Values.resources.limits.memory | toString -}}
{{- if hasSuffix "Gi" $l -}}{{ div (mul (trimSuffix "Gi" $l | atoi) 1024 9) 10 }}MiB
{{- else if hasSuffix "Mi" $l -}}{{ div (mul (trimSuffix "Mi" $l | atoi) 9) 10 }}MiB
{{- else -}}{{ fail "resources.limits.memory: give it in Mi or Gi, or set goMemLimitMiB" }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tokenauthz.hmacSecret" -}}
{{- .Values.redis.hmacKeySecret | default (printf "%s-redis-hmac" (include "tokenauthz.fullname" .)) -}}
{{- end -}}
