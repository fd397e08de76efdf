{{- define "concentrator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "concentrator.operator.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "concentrator.labels" -}}
app.kubernetes.io/name: {{ include "concentrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "concentrator.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "concentrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The Secret with the operator's admin client certificate, if any. */}}
{{- define "concentrator.operator.adminTlsSecret" -}}
{{- if .Values.adminTls.operatorSecretName -}}
{{- .Values.adminTls.operatorSecretName -}}
{{- else if .Values.adminTls.certManager.enabled -}}
{{- printf "%s-admin-tls" (include "concentrator.operator.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The Secret with the chart-created fleet's admin certificate, if any. */}}
{{- define "concentrator.fleet.adminTlsSecret" -}}
{{- if .Values.fleet.adminTlsSecretName -}}
{{- .Values.fleet.adminTlsSecretName -}}
{{- else if .Values.adminTls.certManager.enabled -}}
{{- printf "%s-admin-tls" .Values.fleet.name -}}
{{- end -}}
{{- end -}}
