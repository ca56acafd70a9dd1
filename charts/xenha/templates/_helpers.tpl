{{/*
Names. Every object is called <fullname>-operator or <fullname>-agent so that two releases
(e.g. a canary) never share one.
*/}}
{{- define "xenha.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "xenha.fullname" -}}
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

{{- define "xenha.operator.fullname" -}}
{{- printf "%s-operator" (include "xenha.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "xenha.agent.fullname" -}}
{{- printf "%s-agent" (include "xenha.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "xenha.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "xenha.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "xenha.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "xenha.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The agents' namespace: also where their host Leases live (XENHA_NAMESPACE). */}}
{{- define "xenha.agent.namespace" -}}
{{- default .Release.Namespace .Values.agent.namespace }}
{{- end }}

{{- define "xenha.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "xenha.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: xenha
{{- end }}

{{/* Selector labels must never change across upgrades: only name, instance, component. */}}
{{- define "xenha.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xenha.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "xenha.agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xenha.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "xenha.operator.labels" -}}
{{ include "xenha.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "xenha.agent.labels" -}}
{{ include "xenha.labels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{/* repository:tag, or repository@digest when a digest is pinned. Argument: (list . image). */}}
{{- define "xenha.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
RBAC rules, generated from the Python constants (operator/xenha_operator/rbac.py,
agent/xenha_agent/rbac.py) into files/rbac.yaml; tests/chart checks they agree.
Argument: (list . "operator"|"agent" "cluster"|"namespace").
*/}}
{{- define "xenha.rbacRules" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $scope := index . 2 }}
{{- $all := $root.Files.Get "files/rbac.yaml" | fromYaml }}
{{- $rules := index (index $all $component) $scope }}
{{- toYaml $rules }}
{{- end }}

{{/* The agents' nodeSelector as `key=value key=value`, for kubectl label in NOTES. */}}
{{- define "xenha.agent.nodeLabels" -}}
{{- $pairs := list }}
{{- range $k, $v := .Values.agent.nodeSelector }}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) }}
{{- end }}
{{- join " " $pairs }}
{{- end }}
