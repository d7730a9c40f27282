{{/* Names, labels and images shared by every template. */}}

{{- define "vqkd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vqkd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vqkd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on everything the chart creates. */}}
{{- define "vqkd.labels" -}}
helm.sh/chart: {{ include "vqkd.chart" . }}
app.kubernetes.io/name: {{ include "vqkd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vqkd
{{- end }}

{{/* The operator's pod selector: only labels that never change (a Deployment's selector is immutable). */}}
{{- define "vqkd.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vqkd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "vqkd.operator.labels" -}}
{{ include "vqkd.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "vqkd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vqkd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest, or repository:tag with the chart's appVersion as the default tag. */}}
{{- define "vqkd.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "vqkd.operator.image" -}}
{{ include "vqkd.image" (list .Values.operator.image .) }}
{{- end }}

{{- define "vqkd.km.image" -}}
{{ include "vqkd.image" (list .Values.km.image .) }}
{{- end }}

{{/*
Names fixed by the operator (operator/kopf): KMs dial the ControlPlane service at
vqkd-control-plane.<namespace>.svc:9443, and the operator's certificate names that Service;
the CA lives in Secret vqkd-ca.
*/}}
{{- define "vqkd.controlPlaneService" -}}vqkd-control-plane{{- end }}
{{- define "vqkd.caSecret" -}}vqkd-ca{{- end }}

{{/* The operator's ports (operator/kopf/runtime.py OperatorOptions). */}}
{{- define "vqkd.port.health" -}}8080{{- end }}
{{- define "vqkd.port.metrics" -}}9090{{- end }}
{{- define "vqkd.port.controlPlane" -}}9443{{- end }}

{{/* Where Prometheus finds what to scrape: the operator's Service/pod, and those the operator creates. */}}
{{- define "vqkd.kmSelector" -}}
app.kubernetes.io/name: vqkd-km
app.kubernetes.io/managed-by: vqkd-operator
{{- end }}
{{- define "vqkd.moduleSelector" -}}
app.kubernetes.io/name: vqkd-qkd-module
app.kubernetes.io/managed-by: vqkd-operator
{{- end }}

{{- define "vqkd.monitorsExclusive" -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true: each scrapes every vqkd target, so every series would be collected twice. Enable one of them." }}
{{- end }}
{{- end }}

{{/* Rules across values that the JSON schema cannot state; each failure says what to change. */}}
{{- define "vqkd.validate" -}}
{{- $km := .Values.km }}
{{- if not (and (le (int $km.minKeySize) (int $km.keySize)) (le (int $km.keySize) (int $km.maxKeySize))) }}
{{- fail (printf "km: need minKeySize <= keySize <= maxKeySize, got %d <= %d <= %d" (int $km.minKeySize) (int $km.keySize) (int $km.maxKeySize)) }}
{{- end }}
{{- include "vqkd.monitorsExclusive" . }}
{{- end }}
