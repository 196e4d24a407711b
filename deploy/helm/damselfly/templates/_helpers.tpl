{{- define "damselfly.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "damselfly.fullname" -}}
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

{{- define "damselfly.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: damselfly
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "agent") */}}
{{- define "damselfly.selectorLabels" -}}
app.kubernetes.io/name: {{ include "damselfly.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "damselfly.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "damselfly.trackerPkiSecretName" -}}
{{- if eq .Values.pki.mode "existingSecret" }}
{{- required "pki.existingTrackerSecret is required with pki.mode=existingSecret" .Values.pki.existingTrackerSecret }}
{{- else }}
{{- include "damselfly.fullname" . }}-tracker-pki
{{- end }}
{{- end }}

{{/*
"true" when this render can read the cluster (helm install/upgrade, Flux's helm-controller),
empty under `helm template` (Argo CD, kustomize's helmCharts, `helm install --dry-run`
without =server), where every `lookup` returns nothing. The probe lists Secrets in the
release namespace: Helm itself needs that permission to keep its release records, so a
namespace-scoped installer has it too; a list answers even before the namespace exists
(a get of a Namespace would be NotFound on a first install with --create-namespace, or
Forbidden for a namespace-scoped installer).
*/}}
{{- define "damselfly.clusterAccess" -}}
{{- if lookup "v1" "Secret" .Release.Namespace "" }}true{{ end }}
{{- end }}

{{/* The address every listener binds: IPv4, or a dual-stack IPv6 socket with ipv6=true. */}}
{{- define "damselfly.anyAddress" -}}
{{- .Values.ipv6 | ternary "[::]" "0.0.0.0" }}
{{- end }}

{{- define "damselfly.pkiSecretName" -}}
{{- if eq .Values.pki.mode "existingSecret" }}
{{- required "pki.existingSecret is required with pki.mode=existingSecret" .Values.pki.existingSecret }}
{{- else }}
{{- include "damselfly.fullname" . }}-cluster-pki
{{- end }}
{{- end }}

{{/*
The tracker replicas, comma separated. Each agent picks the replica for a digest by
rendezvous hashing over this list, so every agent must hold the same list: the
StatefulSet's stable pod names give it (a Deployment's pods have no stable DNS names).
*/}}
{{- define "damselfly.trackers" -}}
{{- $name := printf "%s-tracker" (include "damselfly.fullname" .) }}
{{- $list := list }}
{{- range $i := until (int .Values.tracker.replicas) }}
{{- $list = append $list (printf "%s-%d.%s.%s.svc:7400" $name $i $name $.Release.Namespace) }}
{{- end }}
{{- join "," $list }}
{{- end }}

{{- define "damselfly.otlpEndpoint" -}}
{{- if .Values.tracing.otlpEndpoint }}
{{- .Values.tracing.otlpEndpoint }}
{{- else if .Values.jaeger.enabled }}
{{- printf "http://%s-jaeger.%s.svc:4317" (include "damselfly.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* Arguments shared by the node agents and the seed peers (swarm, PKI, limits). */}}
{{- define "damselfly.peerArgs" -}}
- --tracker={{ include "damselfly.trackers" . }}
- --peer-listen={{ include "damselfly.anyAddress" . }}:7401
- --cluster-ca=/etc/damselfly/pki/ca.crt
- --cluster-cert=/etc/damselfly/pki/tls.crt
- --cluster-key=/etc/damselfly/pki/tls.key
{{- with .Values.registries }}
- --registry={{ join "," . }}
{{- end }}
{{- if .Values.upstreamCA.configMap }}
- --upstream-ca=/etc/damselfly/upstream-ca/{{ .Values.upstreamCA.key }}
{{- end }}
{{- with .Values.agent.zone }}
- --zone={{ . }}
{{- end }}
- --upload-rate={{ .Values.agent.uploadRate }}
- --download-rate={{ .Values.agent.downloadRate }}
- --origin-rate={{ .Values.agent.originRate }}
- --max-upload-peers={{ .Values.agent.maxUploadPeers }}
{{- with include "damselfly.otlpEndpoint" . }}
- --otlp-endpoint={{ . }}
{{- end }}
{{- end }}

{{- define "damselfly.pkiVolumes" -}}
- name: pki
  secret:
    secretName: {{ include "damselfly.pkiSecretName" . }}
    defaultMode: 0440
{{- if .Values.upstreamCA.configMap }}
- name: upstream-ca
  configMap:
    name: {{ .Values.upstreamCA.configMap }}
{{- end }}
{{- end }}

{{- define "damselfly.pkiMounts" -}}
- name: pki
  mountPath: /etc/damselfly/pki
  readOnly: true
{{- if .Values.upstreamCA.configMap }}
- name: upstream-ca
  mountPath: /etc/damselfly/upstream-ca
  readOnly: true
{{- end }}
{{- end }}

{{- define "damselfly.agentSecurityContext" -}}
privileged: {{ .Values.agent.privileged }}
{{- if not .Values.agent.privileged }}
capabilities:
  add:
    {{- toYaml .Values.agent.capabilities | nindent 4 }}
{{- end }}
{{- end }}

{{/* Non-root, read-only: the tracker and the seed peers need no privilege. */}}
{{- define "damselfly.restrictedSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}
