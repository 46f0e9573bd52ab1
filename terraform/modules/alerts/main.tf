# Where the hosts' Alertmanager publishes alerts (the monitoring role's receiver "sns"): one
# topic per deployment, encrypted, that only the hosts' role may publish to. Subscribers are
# the operator's choice: alert_email here, or any SNS subscription (SQS, HTTPS, Lambda) added
# outside.

locals {
  # a customer key needs the publisher allowed to use it; the AWS-managed SNS key's own policy
  # already lets SNS use it for every principal of the account that may publish
  customer_key = var.kms_key_arn != null
}

resource "aws_sns_topic" "this" {
  name              = "${var.name}-alerts"
  kms_master_key_id = local.customer_key ? var.kms_key_arn : "alias/aws/sns"
}

# E-mail subscriptions stay "pending confirmation" until the recipient follows the link in the
# message AWS sends: nothing is delivered to the address before that.
resource "aws_sns_topic_subscription" "email" {
  count = var.alert_email != null ? 1 : 0

  topic_arn = aws_sns_topic.this.arn
  protocol  = "email"
  endpoint  = var.alert_email
}

resource "aws_iam_role_policy" "publish" {
  name = "publish-alerts"
  role = var.host_role_name
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      [{ Effect = "Allow", Action = "sns:Publish", Resource = aws_sns_topic.this.arn }],
      local.customer_key ? [{
        Effect    = "Allow"
        Action    = ["kms:GenerateDataKey", "kms:Decrypt"]
        Resource  = var.kms_key_arn
        Condition = { StringEquals = { "kms:ViaService" = "sns.${var.region}.amazonaws.com" } }
      }] : [],
    )
  })
}

# The hosts may send to the web only (TCP 80/443); the `email` receiver's relay needs its
# submission port too (587 for Amazon SES and most relays). SNS needs nothing more: it is 443.
resource "aws_vpc_security_group_egress_rule" "smtp" {
  count = var.smtp_port != null ? 1 : 0

  security_group_id = var.host_security_group_id
  description       = "Outbound SMTP to the alert mail relay"
  ip_protocol       = "tcp"
  from_port         = var.smtp_port
  to_port           = var.smtp_port
  cidr_ipv4         = "0.0.0.0/0"
}
