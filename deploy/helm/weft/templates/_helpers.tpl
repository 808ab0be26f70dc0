{{/*
The namespace of every object: the release namespace, or weft-system when
the release has none (or "default").
*/}}
{{- define "weft.namespace" -}}
{{- if or (not .Release.Namespace) (eq .Release.Namespace "default") -}}
weft-system
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/*
Labels of an object's metadata. Pass a dict: root (the chart context),
name (app.kubernetes.io/name), component (optional).
*/}}
{{- define "weft.labels" -}}
app.kubernetes.io/part-of: weft
{{- with .name }}
app.kubernetes.io/name: {{ . }}
{{- end }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
Labels of a pod template: stable across chart upgrades.
*/}}
{{- define "weft.podLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: weft
{{- end -}}

{{/*
An image reference: pass the image values; root for the appVersion default.
*/}}
{{- define "weft.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{/*
The control plane's SPIFFE identity, which node proxies require it to prove.
*/}}
{{- define "weft.controlPlaneIdentity" -}}
{{- printf "spiffe://%s/ns/%s/sa/weft-control-plane" .Values.trustDomain (include "weft.namespace" .) -}}
{{- end -}}
