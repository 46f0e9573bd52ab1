variable "name" {
  type        = string
  description = "Deployment name; the topic is <name>-alerts."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  type        = string
  description = "Region of the topic (a customer KMS key is used through SNS of this region only)."

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as us-east-1."
  }
}

variable "host_role_name" {
  type        = string
  description = "IAM role of the GPU hosts: it gets sns:Publish on the topic, and nothing else."

  validation {
    condition     = length(var.host_role_name) > 0
    error_message = "host_role_name must name the hosts' IAM role."
  }
}

variable "alert_email" {
  type        = string
  description = "E-mail address subscribed to the topic (AWS mails a confirmation link first); null: no subscription."
  default     = null

  validation {
    condition     = var.alert_email == null || can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", var.alert_email))
    error_message = "alert_email must be null or one e-mail address, such as oncall@example.com."
  }
}

variable "kms_key_arn" {
  type        = string
  description = "ARN of a customer-managed KMS key for the topic; null: the AWS-managed SNS key (alias/aws/sns)."
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/(mrk-[0-9a-f]{32}|[0-9a-f-]{36})$", var.kms_key_arn))
    error_message = "kms_key_arn must be null or a KMS key ARN (arn:aws:kms:<region>:<account>:key/<key id>)."
  }
}

variable "host_security_group_id" {
  type        = string
  description = "Security group of the GPU hosts; it gets the SMTP egress rule when smtp_port is set."
  default     = null
}

variable "smtp_port" {
  type        = number
  description = "Open this TCP port outbound from the hosts, for the monitoring role's `email` receiver (587: STARTTLS submission, as Amazon SES); null: none (SNS needs none)."
  default     = null

  validation {
    condition     = var.smtp_port == null || contains([25, 465, 587, 2465, 2587], coalesce(var.smtp_port, 0))
    error_message = "smtp_port must be null or an SMTP port: 25, 465, 587, 2465 or 2587."
  }
  validation {
    condition     = var.smtp_port == null || var.host_security_group_id != null
    error_message = "smtp_port needs host_security_group_id."
  }
}
