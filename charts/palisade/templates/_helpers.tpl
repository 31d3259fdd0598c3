{{/*
Names are fixed, not prefixed by the release: the proxies verify the CA as
palisade-ca.<namespace>.svc (DESIGN.md), and one mesh runs per cluster.
*/}}

{{- define "palisade.labels" -}}
app.kubernetes.io/part-of: palisade
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "palisade.ca.selectorLabels" -}}
app.kubernetes.io/name: palisade-ca
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "palisade.injector.selectorLabels" -}}
app.kubernetes.io/name: palisade-injector
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* An image reference: (dict "image" .Values.x.image "root" .) */}}
{{- define "palisade.image" -}}
{{- $registry := .image.registry | default .root.Values.image.registry -}}
{{- $ref := printf "%s/%s" $registry .image.repository | trimPrefix "/" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $ref .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}
{{- end }}

{{/* DNS name of the CA service: what every proxy verifies the CA's certificate against. */}}
{{- define "palisade.ca.host" -}}
palisade-ca.{{ .Release.Namespace }}.svc
{{- end }}

{{/* Pod Security "restricted" for every control-plane pod and container. */}}
{{- define "palisade.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "palisade.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Spread replicas over nodes and zones: (dict "whenUnsatisfiable" .. "selector" ..) */}}
{{- define "palisade.topologySpread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: {{ .whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- .selector | nindent 8 }}
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: {{ .whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- .selector | nindent 8 }}
{{- end }}

{{/* Namespaces the webhook never touches. */}}
{{- define "palisade.injector.excludedNamespaces" -}}
{{- $ns := list "kube-system" .Release.Namespace -}}
{{- range .Values.injector.excludeNamespaces }}{{ $ns = append $ns . }}{{ end -}}
{{- $ns | uniq | toJson -}}
{{- end }}

{{- define "palisade.serviceMonitorEnabled" -}}
{{- if and .Values.monitoring.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
true
{{- end -}}
{{- end }}

{{/*
"true" when palisade-ca issues the webhook's serving certificate and keeps its caBundle
(injector.webhook.certIssuer palisade-ca, the default); cert-manager, when enabled, wins.
*/}}
{{- define "palisade.injectorTLSByCA" -}}
{{- if and (not .Values.injector.webhook.certManager.enabled) (eq .Values.injector.webhook.certIssuer "palisade-ca") -}}
true
{{- end -}}
{{- end }}
