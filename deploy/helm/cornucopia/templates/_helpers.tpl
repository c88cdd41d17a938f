{{/*
Naming and labels. Every object of a component is named <prefix>-<component>,
where the prefix is the release name (or fullnameOverride); the gRPC peers'
addresses (<NAME>_GRPC_ADDR) are built from the same helper, so a Service's
name and the address the other components dial cannot drift apart.
*/}}

{{- define "cornucopia.prefix" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* dict "root" $ "name" <component> */}}
{{- define "cornucopia.componentName" -}}
{{- printf "%s-%s" (include "cornucopia.prefix" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cornucopia.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* dict "root" $ "name" <component> */}}
{{- define "cornucopia.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* dict "root" $ "name" <component> */}}
{{- define "cornucopia.labels" -}}
helm.sh/chart: {{ include "cornucopia.chart" .root }}
{{ include "cornucopia.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: cornucopia
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "cornucopia.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* An environment variable read from existingSecret. dict "secret" <name> "env" <VAR> "key" <key> ["optional" true] */}}
{{- define "cornucopia.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/* Where the partner endpoint's Secret is mounted, read-only. */}}
{{- define "cornucopia.partnerTlsDir" -}}
/etc/cornucopia/partner-tls
{{- end -}}

{{/*
The environment of one component. dict "root" $ "name" <component> "component" <values>
*/}}
{{- define "cornucopia.env" -}}
{{- $root := .root -}}
{{- $name := .name -}}
{{- $c := .component -}}
{{- $secret := required "existingSecret: name the Secret that holds token-secret, the <service>-database-url keys and the members keys" $root.Values.existingSecret -}}
- name: CORNUCOPIA_ENV
  value: {{ $root.Values.environment | quote }}
- name: NATS_URL
  value: {{ required "nats.url is required" $root.Values.nats.url | quote }}
- name: LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
- name: CORNUCOPIA_VAR_DIR
  value: /tmp/cornucopia
{{- if eq $c.kind "grpc" }}
- name: NATS_STREAM_REPLICAS
  value: {{ int $root.Values.nats.streamReplicas | toString | quote }}
- name: GRPC_LISTEN
  value: {{ printf "0.0.0.0:%d" (int $c.port) | quote }}
{{- $partner := $c.partner | default dict }}
{{- if $partner.enabled }}
{{- $prefix := printf "%s_PARTNER" (upper $name | replace "-" "_") }}
{{- $dir := include "cornucopia.partnerTlsDir" $root }}
- name: {{ printf "%s_GRPC_LISTEN" $prefix }}
  value: {{ printf "0.0.0.0:%d" (int $partner.port) | quote }}
- name: {{ printf "%s_TLS_CERT" $prefix }}
  value: {{ printf "%s/tls.crt" $dir | quote }}
- name: {{ printf "%s_TLS_KEY" $prefix }}
  value: {{ printf "%s/tls.key" $dir | quote }}
- name: {{ printf "%s_CLIENT_CA" $prefix }}
  value: {{ printf "%s/ca.crt" $dir | quote }}
{{- end }}
{{- else }}
- name: HTTP_LISTEN
  value: {{ printf "0.0.0.0:%d" (int $c.port) | quote }}
{{- end }}
{{- range $peer, $p := $root.Values.components }}
{{- if and $p.enabled (eq $p.kind "grpc") }}
- name: {{ printf "%s_GRPC_ADDR" (upper $peer | replace "-" "_") }}
  value: {{ printf "%s:%d" (include "cornucopia.componentName" (dict "root" $root "name" $peer)) (int $p.port) | quote }}
{{- end }}
{{- end }}
{{- with $root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "cornucopia-%s" $name | quote }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME)"
{{- end }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" "CORNUCOPIA_TOKEN_SECRET" "key" "token-secret") }}
{{- if eq $c.kind "grpc" }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" (printf "%s_DATABASE_URL" (upper $name | replace "-" "_")) "key" (printf "%s-database-url" $name)) }}
{{- end }}
{{- if eq $name "members" }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" "MEMBERS_MASTER_KEYS" "key" "members-master-keys") }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" "MEMBERS_ACTIVE_KEY_ID" "key" "members-active-key-id" "optional" true) }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" "MEMBERS_BLIND_INDEX_KEY" "key" "members-blind-index-key") }}
{{- end }}
{{- if eq $name "notify" }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" "NOTIFY_SMTP_PASSWORD" "key" "notify-smtp-password" "optional" true) }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" "NOTIFY_SMS_API_KEY" "key" "notify-sms-api-key" "optional" true) }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" "NOTIFY_PUSH_SECRET" "key" "notify-push-secret" "optional" true) }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" "NOTIFY_LINK_SECRET" "key" "notify-link-secret") }}
{{- end }}
{{- if eq $name "gateway" }}
{{ include "cornucopia.secretEnv" (dict "secret" $secret "env" "NOTIFY_RECEIPT_SECRET" "key" "notify-receipt-secret" "optional" true) }}
{{- end }}
{{- range $key, $value := $c.env }}
- name: {{ $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* periodSeconds, timeoutSeconds and failureThreshold of a probe. */}}
{{- define "cornucopia.probeTiming" -}}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- end -}}
