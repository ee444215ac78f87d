{{/*
Names. Kubernetes names are at most 63 characters; suffixes are kept, so the prefix is cut to
leave them room.
*/}}
{{- define "wgpin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wgpin.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "wgpin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<fullname>-operator" and "<fullname>-agent": at most 54 + 9 = 63 characters. */}}
{{- define "wgpin.operator.fullname" -}}
{{- printf "%s-operator" (include "wgpin.fullname" .) -}}
{{- end -}}

{{- define "wgpin.agent.fullname" -}}
{{- printf "%s-agent" (include "wgpin.fullname" .) -}}
{{- end -}}

{{/*
Labels. Call with (dict "context" $ "component" "operator"|"agent").
*/}}
{{- define "wgpin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wgpin.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "wgpin.labels" -}}
helm.sh/chart: {{ include "wgpin.chart" .context }}
{{ include "wgpin.selectorLabels" . }}
app.kubernetes.io/version: {{ .context.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: wgpin
app.kubernetes.io/managed-by: {{ .context.Release.Service }}
{{- with .context.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* ServiceAccount names. */}}
{{- define "wgpin.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "wgpin.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "wgpin.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (include "wgpin.agent.fullname" .) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference. Call with (dict "image" .Values.X.image "context" $): repository@digest
when a digest is set, else repository:tag (tag defaults to the chart's appVersion).
*/}}
{{- define "wgpin.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .context.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
A listen address for --metrics-addr: "ADDR:PORT", or "[ADDR]:PORT" for IPv6.
Call with .Values.X.metrics.
*/}}
{{- define "wgpin.listenAddress" -}}
{{- if contains ":" .bindAddress -}}
{{- printf "[%s]:%d" .bindAddress (int .port) -}}
{{- else -}}
{{- printf "%s:%d" .bindAddress (int .port) -}}
{{- end -}}
{{- end -}}
