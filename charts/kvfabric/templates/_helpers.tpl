{{- define "kvfabric.name" -}}kvfabric{{- end -}}

{{- define "kvfabric.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvfabric.labels" -}}
app.kubernetes.io/name: {{ include "kvfabric.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kvfabric.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvfabric.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kvfabric.webhookService" -}}
{{- printf "%s-webhook" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Cluster-scoped: the release's namespace in the name, so two releases never collide. */}}
{{- define "kvfabric.webhookConfiguration" -}}
{{- printf "%s.%s.kvfabric.io" .Release.Name .Release.Namespace -}}
{{- end -}}

{{/* DNS names and IPs the webhook's certificate must cover. */}}
{{- define "kvfabric.webhookHosts" -}}
{{- $svc := include "kvfabric.webhookService" . -}}
{{- $hosts := list (printf "%s.%s.svc" $svc .Release.Namespace) $svc -}}
{{- if .Values.webhook.url -}}
{{- $hosts = append $hosts (regexReplaceAll ":[0-9]+$" (urlParse .Values.webhook.url).host "") -}}
{{- end -}}
{{- join "," $hosts -}}
{{- end -}}

{{- define "kvfabric.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{- define "kvfabric.agentImage" -}}
{{- printf "%s:%s" .Values.agent.image.repository (.Values.agent.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
